# Shell library of the nbd-migrate test guest, sourced by /init and by the
# host's /scenario.sh. POSIX sh for busybox ash.
#
# Marker lines: "@@NBDM KIND ARGS...". The host (test/guest/qemu.ts) picks them
# out of the serial transcript, where they may be mixed with kernel messages.
#   RESULT ok ...    the scenario passed (required for the host to pass a run)
#   RESULT fail WHY  it failed
#   PROGRESS N ...   a workload round finished
#   WAIT NAME        the guest waits for the host to send a line (host_says)
#   GAP / GAPS / PROBE  write latency seen by the guest (latency_probe)
#   SUM / INFO ...   anything else worth logging

# Markers go straight to the console, so that they are seen even from inside
# a command substitution.
marker() { echo "@@NBDM $*" >/dev/console; }
ok() { marker RESULT ok "$@"; }
fail() { marker RESULT fail "$@"; }
# Fail and power off at once (from any depth of subshell).
die() {
  fail "$@"
  sync
  poweroff -f
  sleep 2
  reboot -f
}

# pattern TAG FIRST COUNT: COUNT 512-byte sectors for sectors FIRST..; each
# sector is "TAG sector N" padded with spaces to 511 bytes plus "\n", so every
# sector holds its own number (test/guest/workload.ts makes the same bytes).
pattern() {
  awk -v tag="$1" -v first="$2" -v n="$3" \
    'BEGIN { for (i = 0; i < n; i++) printf "%-511s\n", tag " sector " (first + i) }'
}

md5() { md5sum "$@" | cut -d' ' -f1; }

# Sector numbers given to the dd helpers must be multiples of 128 (64 KiB).
_blocks() {
  [ $(($1 % 128)) -eq 0 ] || die "$1 sectors is not a multiple of 64 KiB"
  echo $(($1 / 128))
}

# write_file DEV FILE FIRST [direct|buffered]: write FILE at sector FIRST.
# DEV may also be a regular file (conv=notrunc: dd would truncate it).
write_file() {
  _wf_flag=oflag=direct
  [ "${4:-direct}" = buffered ] && _wf_flag=conv=notrunc
  dd if="$2" of="$1" bs=64k seek="$(_blocks "$3")" "$_wf_flag" conv=notrunc 2>/tmp/dd.err ||
    { fail "dd to $1 failed: $(cat /tmp/dd.err)"; return 1; }
}

# read_md5 DEV FIRST COUNT: md5 of COUNT sectors from FIRST, read with O_DIRECT.
read_md5() {
  dd if="$1" of=/tmp/read.bin bs=64k skip="$(_blocks "$2")" count="$(_blocks "$3")" iflag=direct 2>/tmp/dd.err ||
    { fail "dd from $1 failed: $(cat /tmp/dd.err)"; return 1; }
  md5 /tmp/read.bin
  rm -f /tmp/read.bin
}

drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
}

# host_says NAME: announce "WAIT NAME" and print the next line the host sends.
host_says() {
  marker WAIT "$1"
  read -r _hs_line || die "console closed while waiting for the host ($1)"
  echo "$_hs_line"
}

# workload DEV FIRST COUNT ROUNDS TAG: a continuous write-and-verify load.
# Round r writes pattern "TAG.r" over the region with O_DIRECT and reads it
# back; before that it checks the region still holds round r-1's pattern, so
# a write lost between rounds (e.g. across a migration) is caught. After each
# round: "PROGRESS r MD5". A line "stop" from the host ends it after the
# current round. Prints "WORKLOAD done ROUNDS MD5" at the end.
workload() {
  _w_dev=$1 _w_first=$2 _w_count=$3 _w_rounds=$4 _w_tag=$5
  _w_r=0 _w_prev=""
  while [ "$_w_r" -lt "$_w_rounds" ]; do
    _w_r=$((_w_r + 1))
    if [ -n "$_w_prev" ]; then
      _w_got=$(read_md5 "$_w_dev" "$_w_first" "$_w_count") || return 1
      [ "$_w_got" = "$_w_prev" ] ||
        { fail "round $_w_r: region lost round $((_w_r - 1))'s data: md5 $_w_got, expected $_w_prev"; return 1; }
    fi
    pattern "$_w_tag.$_w_r" "$_w_first" "$_w_count" >/tmp/w.pat
    _w_exp=$(md5 /tmp/w.pat)
    write_file "$_w_dev" /tmp/w.pat "$_w_first" direct || return 1
    _w_got=$(read_md5 "$_w_dev" "$_w_first" "$_w_count") || return 1
    [ "$_w_got" = "$_w_exp" ] ||
      { fail "round $_w_r: read back md5 $_w_got, expected $_w_exp"; return 1; }
    _w_prev=$_w_exp
    marker PROGRESS "$_w_r" "$_w_exp"
    if read -t 0.05 -r _w_cmd && [ "$_w_cmd" = stop ]; then break; fi
  done
  rm -f /tmp/w.pat
  marker WORKLOAD done "$_w_r" "$_w_prev"
}

# now_ns: set _now to the kernel's monotonic clock (ktime_get) in nanoseconds,
# read from the "now at N nsecs" line at the top of /proc/timer_list, without
# forking: busybox date has no %N and /proc/uptime counts in 10 ms steps.
# One read takes about 0.5 ms under TCG. Under TCG the guest's clock follows
# the host's (no icount), so guest intervals are real time.
now_ns() {
  { read -r _n_l; read -r _n_l; read -r _n_a _n_b _now _n_c; } </proc/timer_list
  [ "$_n_a $_n_b" = "now at" ] || die "no 'now at' line in /proc/timer_list: $_n_a $_n_b $_now"
}

# latency_probe DEV FIRST COUNT TAG SLOW_MS NAP: write latency as the guest sees it.
# Writes 4 KiB blocks with O_DIRECT one after the other (a dd each), round and
# round over COUNT sectors from FIRST (COUNT a multiple of 128); even laps
# write pattern "TAG.a", odd laps "TAG.b". After each write completes it reads
# now_ns: the gap between two consecutive completions is the pause a guest
# application would see. Between writes it naps NAP seconds (a `read -t` on a
# fifo, no fork; 0 for none). The resolution is one turn of the loop: a dd's
# fork and exec, the nap, a now_ns, about 25 ms under TCG with NAP 0.01.
#
# The phase is the first line of /tmp/probe.phase, written by the scenario
# (create it first). When it changes, the phase that ended is summed up:
#   GAPS PHASE WRITES MAX_US MAX_END_NS START_NS END_NS
# (the largest gap in microseconds and the now_ns at its end). Each gap of
# SLOW_MS or more is also reported as it happens: "GAP US END_NS PHASE".
# Phase "stop" ends the probe at the end of the current lap; it then checks
# the region holds that lap's pattern and prints "PROBE done WRITES LAPS TAG.x MD5".
latency_probe() {
  _p_dev=$1 _p_first=$2 _p_count=$3 _p_tag=$4 _p_slow=$(($5 * 1000000)) _p_nap=$6
  _p_blocks=$(($3 / 8)) _p_seek0=$(($2 / 8))
  _blocks "$_p_first" >/dev/null && _blocks "$_p_count" >/dev/null
  pattern "$_p_tag.a" "$_p_first" "$_p_count" >/tmp/probe.a
  pattern "$_p_tag.b" "$_p_first" "$_p_count" >/tmp/probe.b
  rm -f /tmp/probe.nap
  mkfifo /tmp/probe.nap && exec 4<>/tmp/probe.nap || { fail "latency_probe: cannot make its fifo"; return 1; }
  read -r _p_ph </tmp/probe.phase || { fail "latency_probe: no /tmp/probe.phase"; return 1; }
  _p_lap=0 _p_i=0 _p_n=0 _p_all=0 _p_max=0 _p_maxat=0 _p_src=/tmp/probe.a
  now_ns
  _p_prev=$_now _p_start=$_now
  while :; do
    dd if=$_p_src of="$_p_dev" bs=4k count=1 skip=$_p_i seek=$((_p_seek0 + _p_i)) oflag=direct 2>/tmp/probe.err ||
      { fail "latency_probe: write failed: $(cat /tmp/probe.err)"; return 1; }
    now_ns
    _p_gap=$((_now - _p_prev)) _p_prev=$_now _p_n=$((_p_n + 1)) _p_all=$((_p_all + 1))
    if [ "$_p_gap" -gt "$_p_max" ]; then _p_max=$_p_gap _p_maxat=$_now; fi
    [ "$_p_gap" -ge "$_p_slow" ] && marker GAP "$((_p_gap / 1000))" "$_now" "$_p_ph"
    _p_i=$((_p_i + 1))
    if [ "$_p_i" -ge "$_p_blocks" ]; then
      [ "$_p_ph" = stop ] && break
      _p_i=0 _p_lap=$((_p_lap + 1))
      [ $((_p_lap % 2)) -eq 0 ] && _p_src=/tmp/probe.a || _p_src=/tmp/probe.b
    fi
    if [ "$_p_ph" != stop ]; then
      read -r _p_new </tmp/probe.phase
      if [ "$_p_new" != "$_p_ph" ]; then
        marker GAPS "$_p_ph" "$_p_n" "$((_p_max / 1000))" "$_p_maxat" "$_p_start" "$_now"
        _p_ph=$_p_new _p_n=0 _p_max=0 _p_maxat=0 _p_start=$_now
      fi
    fi
    [ "$_p_nap" = 0 ] || read -t "$_p_nap" _p_x <&4
  done
  exec 4<&-
  _p_want=$(md5 $_p_src)
  _p_got=$(dd if="$_p_dev" bs=64k skip=$((_p_first / 128)) count=$((_p_count / 128)) iflag=direct 2>/tmp/probe.err | md5sum | cut -d' ' -f1)
  [ "$_p_got" = "$_p_want" ] ||
    { fail "latency_probe: the region reads back as md5 $_p_got, expected $_p_want ($(cat /tmp/probe.err))"; return 1; }
  marker PROBE done "$_p_all" "$_p_lap" "$_p_tag.${_p_src#/tmp/probe.}" "$_p_want"
}
