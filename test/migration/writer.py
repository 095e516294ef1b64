#!/usr/bin/python3
"""A guest stand-in for the migration tests: writes random data at random
offsets through NBD (python3-libnbd) until STOPFILE appears, and applies each
acknowledged write to a shadow image, so the shadow is exactly what the
"guest" believes the disk holds. Prints one JSON line: writes, errors, and the
largest single write latency in ms (the pause a guest saw)."""
import json, os, random, sys, time
import nbd

uri, shadow_path, stopfile = sys.argv[1], sys.argv[2], sys.argv[3]
block = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
region = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # 0: whole disk

h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
span = (region or size) // block
shadow = open(shadow_path, 'r+b')
rng = random.Random(int(os.environ.get('WRITER_SEED', '1')))
writes = errors = 0
max_ms = 0.0
first_error = None
while not os.path.exists(stopfile):
    off = rng.randrange(span) * block
    data = rng.randbytes(block)
    t0 = time.monotonic()
    try:
        h.pwrite(data, off)
    except nbd.Error as e:
        errors += 1
        first_error = first_error or str(e)
        continue
    max_ms = max(max_ms, (time.monotonic() - t0) * 1000)
    shadow.seek(off)
    shadow.write(data)
    writes += 1
h.flush()
h.shutdown()
shadow.close()
print(json.dumps({"writes": writes, "errors": errors, "maxLatencyMs": round(max_ms, 2), "firstError": first_error}))
