/**
 * The fio jobs, identical for every server: one connection (numjobs=1) through
 * fio's libnbd-based `nbd` engine, time-based so a fast and a slow server are
 * measured over the same wall time.
 */

export interface JobSpec {
  /** Name used in BENCH_JOBS, the table and the JSON. */
  name: 'seqread' | 'seqwrite' | 'randread' | 'randwrite' | 'syncwrite';
  /** fio --rw. */
  rw: 'read' | 'write' | 'randread' | 'randwrite';
  /** fio --bs. */
  bs: string;
  /** Which figure the table reports: bandwidth (MB/s) or IOPS. */
  metric: 'bw' | 'iops';
  direction: 'read' | 'write';
  /** A FLUSH after every write (fio --fsync=1): what a database in a guest does. */
  fsync?: boolean;
  /** fio --iodepth for this job, instead of BENCH_IODEPTH. */
  iodepth?: number;
}

export const JOBS: readonly JobSpec[] = [
  { name: 'seqread', rw: 'read', bs: '1M', metric: 'bw', direction: 'read' },
  { name: 'seqwrite', rw: 'write', bs: '1M', metric: 'bw', direction: 'write' },
  { name: 'randread', rw: 'randread', bs: '4k', metric: 'iops', direction: 'read' },
  { name: 'randwrite', rw: 'randwrite', bs: '4k', metric: 'iops', direction: 'write' },
  // One 4 KiB random write at a time, each followed by a FLUSH: a server's latency per write and per flush.
  { name: 'syncwrite', rw: 'randwrite', bs: '4k', metric: 'iops', direction: 'write', fsync: true, iodepth: 1 },
];

export type JobName = JobSpec['name'];

export function jobByName(name: JobName): JobSpec {
  const j = JOBS.find((x) => x.name === name);
  if (!j) throw new Error(`unknown job ${name}`);
  return j;
}
