// The agent cycle against BullMQ (Redis), a peer queue, shaped like `bench`: one Node
// process (one core) as the client, AGENTS jobs in progress at once (a Worker with that
// concurrency), each job a no-op, until the queue is drained; jobs are created first with
// addBulk, 1,000 per call, 4 calls in flight.
//
//   apt-get install redis-server nodejs npm
//   cd examples/peers && npm install --no-save bullmq@5
//   redis-server --port 6390 --appendonly yes --appendfsync always --save '' --dir "$(mktemp -d)" &
//   REDIS_PORT=6390 REDIS_PID=$! AGENTS=64 TASKS=20000 node bullmq.mjs
//
// `--appendfsync always` is Redis's full durability (its answers wait for the fsync of the
// append-only file, one per turn of its event loop); `everysec`, its default with AOF on,
// can lose the last second. Give REDIS_PID to report the server's CPU per cycle.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Queue, Worker } from 'bullmq';

const TASKS = +(process.env.TASKS ?? 20000);
const AGENTS = +(process.env.AGENTS ?? 64);
const connection = { host: '127.0.0.1', port: +(process.env.REDIS_PORT ?? 6379) };
const redisPid = process.env.REDIS_PID;

const ticks = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (+f[11] + +f[12]) / 100;
};
const serverCpu = () => (redisPid ? ticks(redisPid) : NaN);
const clientCpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };

const queue = new Queue('bench', { connection });
await queue.obliterate({ force: true });

let t0 = performance.now(), s0 = serverCpu();
const per = Math.ceil(TASKS / 4);
await Promise.all([0, 1, 2, 3].map(async (i) => {
  for (let left = Math.min(per, TASKS - i * per); left > 0; left -= 1000) {
    const n = Math.min(1000, left);
    await queue.addBulk(Array.from({ length: n }, () => ({ name: 't', data: { instructions: 'bench task' } })));
  }
}));
let secs = (performance.now() - t0) / 1000;
const { version } = createRequire(import.meta.url)('bullmq/package.json');
console.log(`BullMQ ${version}, ${AGENTS} in progress, ${TASKS} jobs`);
console.log(`bulk create (1000/call, 4 in flight): ${(TASKS / secs).toFixed(0)} jobs/s, server ${((serverCpu() - s0) * 1e6 / TASKS).toFixed(1)} µs/job`);

let done = 0, finished;
const drained = new Promise((r) => { finished = r; });
t0 = performance.now(); s0 = serverCpu(); const c0 = clientCpu();
const worker = new Worker('bench', async () => 'ok', { connection, concurrency: AGENTS });
worker.on('completed', () => { if (++done === TASKS) finished(); });
await drained;
secs = (performance.now() - t0) / 1000;
const s1 = serverCpu(), c1 = clientCpu();
console.log(`agent cycle (${AGENTS} in progress): ${(TASKS / secs).toFixed(0)} cycles/s`);
console.log(`  CPU per cycle: server ${((s1 - s0) * 1e6 / TASKS).toFixed(0)} µs, client ${((c1 - c0) * 1e6 / TASKS).toFixed(0)} µs`);
await worker.close();
await queue.close();
