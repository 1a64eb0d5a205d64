// A light node process, as most of a host's are: a little work every 20 ms and one block of
// BLOCK_MS (argv[3], default 150) in `lightBlock` every PERIOD_MS (argv[2], default 30000), the
// first at a random point of the first period (so that many of them spread their blocks). A
// SIGUSR2 makes one block at once. After each block it prints a JSON line: its pid, the wall
// time the block ended (ms since the epoch) and the block's length as it measured it.
'use strict';
const periodMs = Number(process.argv[2] || 30000);
const blockMs = Number(process.argv[3] || 150);

setInterval(() => JSON.stringify({ a: [1, 2, 3], t: Date.now() }), 20);

function lightBlock() {
  const t = performance.now();
  while (performance.now() - t < blockMs);
}

function block() {
  const start = performance.now();
  lightBlock();
  const end = performance.now();
  const line = { pid: process.pid, end_unix_ms: performance.timeOrigin + end, measured_ms: end - start };
  process.stdout.write(JSON.stringify(line) + '\n');
}

process.on('SIGUSR2', () => setImmediate(block));
setTimeout(() => {
  block();
  setInterval(block, periodMs);
}, Math.random() * periodMs);
process.stdout.write(JSON.stringify({ ready: process.pid }) + '\n');
