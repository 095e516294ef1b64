#!/usr/bin/python3
"""A guest-like writer for the cutover4 bench row (python3-libnbd).

usage: cutover-writer.py URI ALT_URI SIZE
Writes 4 KiB blocks at random offsets of [0, SIZE), one at a time, to URI.
When a write or the connection fails (handoff "disconnect"), it connects
again, to ALT_URI if given (the destination) else to URI, retrying every
2 ms, and writes the failed block again. Prints "started" once connected.
On SIGTERM it prints one JSON line: writes, errors, reconnects, and every gap
between consecutive write completions longer than 5 ms as [start epoch ms,
gap ms], the longest gap, and each reconnection as [last completion, error
seen, connected again] in epoch ms.
"""
import json, os, random, signal, sys, time
import nbd

uri, alt, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

def connect(u):
    h = nbd.NBD()
    h.connect_uri(u)
    return h

h = connect(uri)
buf = os.urandom(4096)
blocks = size // 4096
print("started", flush=True)
writes = errors = reconnects = 0
# Each reconnection: [last completion, error seen, connected again] (epoch ms).
handoffs = []
gaps = []
last = time.time()
longest = [last * 1000, 0.0]
while not stop:
    off = random.randrange(blocks) * 4096
    try:
        h.pwrite(buf, off)
    except Exception as e:  # the connection went away or the write failed
        errors += 1
        t_err = time.time()
        try:
            h.close()
        except Exception:
            pass
        h = None
        while h is None and not stop:
            try:
                h = connect(alt or uri)
                reconnects += 1
                handoffs.append([round(last * 1000, 1), round(t_err * 1000, 1), round(time.time() * 1000, 1)])
            except Exception:
                time.sleep(0.002)
        continue
    now = time.time()
    writes += 1
    g = (now - last) * 1000
    if g > 5:
        gaps.append([round(last * 1000, 1), round(g, 2)])
    if g > longest[1]:
        longest = [round(last * 1000, 1), round(g, 2)]
    last = now
print(json.dumps({"writes": writes, "errors": errors, "reconnects": reconnects, "gaps": gaps, "longest": longest, "handoffs": handoffs}), flush=True)
