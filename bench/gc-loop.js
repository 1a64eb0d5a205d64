// A loop that collects garbage all the time and never blocks: a setImmediate chain whose every
// iteration makes about 256 KiB of short-lived objects (scavenges) and keeps one of every few
// in a ring of RETAINED_MB (argv[2], default 8) MiB, so the old generation fills and is
// mark-compacted too, each pause well under the 100 ms threshold. Prints its pid as one JSON
// line once running, then once a second the GCs it saw so far, and the longest GC pause and
// loop iteration (ms) of that second.
'use strict';
const { PerformanceObserver, constants } = require('perf_hooks');
const retainedMb = Number(process.argv[2] || 8);

const ring = new Array(retainedMb * 16).fill(null); // 64 KiB entries
let slot = 0;
const gcs = { minor: 0, major: 0, longest_ms: 0 };
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    if (entry.detail?.kind === constants.NODE_PERFORMANCE_GC_MAJOR) gcs.major++;
    else gcs.minor++;
    gcs.longest_ms = Math.max(gcs.longest_ms, entry.duration);
  }
}).observe({ entryTypes: ['gc'] });

let longestIteration = 0;
let last = performance.now();
let iterations = 0;
function tick() {
  const now = performance.now();
  longestIteration = Math.max(longestIteration, now - last);
  last = now;
  const batch = [];
  for (let i = 0; i < 4096; i++) batch.push({ i, s: 'x' + i });
  if (++iterations % 4 === 0) {
    ring[slot] = new Array(8192).fill(iterations);
    slot = (slot + 1) % ring.length;
  }
  setImmediate(tick);
}
setInterval(() => {
  process.stdout.write(JSON.stringify({ ...gcs, longest_iteration_ms: longestIteration }) + '\n');
  longestIteration = 0;
  gcs.longest_ms = 0;
}, 1000);
process.stdout.write(JSON.stringify({ ready: process.pid }) + '\n');
tick();
