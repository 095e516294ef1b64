# Shell library of the nbd-migrate test guest, sourced by /init and by the
# host's /scenario.sh. POSIX sh for busybox ash.
#
# Marker lines: "@@NBDM KIND ARGS...". The host (test/guest/qemu.ts) picks them
# out of the serial transcript, where they may be mixed with kernel messages.
#   RESULT ok ...    the scenario passed (required for the host to pass a run)
#   RESULT fail WHY  it failed
#   PROGRESS N ...   a workload round finished
#   WAIT NAME        the guest waits for the host to send a line (host_says)
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
write_file() {
  _wf_flag=oflag=direct
  [ "${4:-direct}" = buffered ] && _wf_flag=conv=notrunc
  dd if="$2" of="$1" bs=64k seek="$(_blocks "$3")" "$_wf_flag" 2>/tmp/dd.err ||
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
