// A loop doing as many iterations as it can: a setImmediate chain. Prints its iteration rate
// for each window of WINDOW_MS (argv[2], default 1000) as one JSON line, forever, with the
// wall time the window began.
'use strict';
const windowMs = Number(process.argv[2] || 1000);
let iterations = 0;
let windowStart = process.hrtime.bigint();
let windowStartUnixMs = Date.now();
function tick() {
  iterations++;
  if ((iterations & 1023) === 0) {
    const now = process.hrtime.bigint();
    const elapsedMs = Number(now - windowStart) / 1e6;
    if (elapsedMs >= windowMs) {
      const perSecond = (iterations * 1000) / elapsedMs;
      process.stdout.write(JSON.stringify({ per_second: perSecond, start_unix_ms: windowStartUnixMs }) + '\n');
      iterations = 0;
      windowStart = now;
      windowStartUnixMs = Date.now();
    }
  }
  setImmediate(tick);
}
tick();
