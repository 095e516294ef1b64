/**
 * The fio jobs, identical for every server: one connection (numjobs=1) through
 * fio's libnbd-based `nbd` engine, time-based so a fast and a slow server are
 * measured over the same wall time.
 */

export interface JobSpec {
  /** Name used in BENCH_JOBS, the table and the JSON. */
  name: 'seqread' | 'seqwrite' | 'randread' | 'randwrite';
  /** fio --rw. */
  rw: 'read' | 'write' | 'randread' | 'randwrite';
  /** fio --bs. */
  bs: string;
  /** Which figure the table reports: bandwidth (MB/s) or IOPS. */
  metric: 'bw' | 'iops';
  direction: 'read' | 'write';
}

export const JOBS: readonly JobSpec[] = [
  { name: 'seqread', rw: 'read', bs: '1M', metric: 'bw', direction: 'read' },
  { name: 'seqwrite', rw: 'write', bs: '1M', metric: 'bw', direction: 'write' },
  { name: 'randread', rw: 'randread', bs: '4k', metric: 'iops', direction: 'read' },
  { name: 'randwrite', rw: 'randwrite', bs: '4k', metric: 'iops', direction: 'write' },
];

export type JobName = JobSpec['name'];

export function jobByName(name: JobName): JobSpec {
  const j = JOBS.find((x) => x.name === name);
  if (!j) throw new Error(`unknown job ${name}`);
  return j;
}
