// A small HTTP service for the overhead benchmark: answers every request with a little JSON.
// Prints its port on stdout once listening. MONITOR (env) loads what users run in-process today
// to watch their event loop, so that its cost can be measured against loopbpf's:
//   async-hooks  the classic async_hooks before/after monitor (times every callback)
//   blocked-at   the blocked-at package (async_hooks plus a stack per async resource)
//   prom-client  prom-client's collectDefaultMetrics (event-loop lag and the rest)
'use strict';
const http = require('http');

function asyncHooksMonitor(thresholdMs) {
  const asyncHooks = require('async_hooks');
  const started = new Map();
  asyncHooks
    .createHook({
      before(id) {
        started.set(id, process.hrtime.bigint());
      },
      after(id) {
        const start = started.get(id);
        started.delete(id);
        if (start !== undefined && Number(process.hrtime.bigint() - start) / 1e6 > thresholdMs) {
          process.stderr.write(`blocked in async resource ${id}\n`);
        }
      },
      destroy(id) {
        started.delete(id);
      },
    })
    .enable();
}

const monitors = {
  none: () => {},
  'async-hooks': () => asyncHooksMonitor(100),
  'blocked-at': () =>
    require('blocked-at')((ms, stack) => process.stderr.write(`blocked ${ms} ms\n${stack}\n`), { threshold: 100 }),
  'prom-client': () => require('prom-client').collectDefaultMetrics(),
};
monitors[process.env.MONITOR || 'none']();

const server = http.createServer((req, res) => {
  const body = JSON.stringify({ path: req.url, time: Date.now(), items: [1, 2, 3] });
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(body);
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
