// An HTTP service with the usual ways of blocking its event loop: the app `loopbpf`'s quick
// start profiles. It serves requests to itself, and now and then a handler does too much.
'use strict';
const http = require('http');
const crypto = require('crypto');
const zlib = require('zlib');

const catalog = Array.from({ length: 200000 }, (_, i) => ({ id: i, name: `product ${i}`, price: i % 100 }));

const routes = {
  '/health': () => 'ok',
  // Serializes the whole catalog for every request: ~150 ms of JSON.stringify.
  '/export': () => JSON.stringify(catalog),
  // Hashes a password on the event loop instead of with crypto.pbkdf2 (async).
  '/login': () => crypto.pbkdf2Sync('hunter2', 'salt', 300000, 64, 'sha512').toString('hex'),
  // Compresses a report synchronously.
  '/report': () => zlib.gzipSync(Buffer.alloc(8 << 20, 'a'), { level: 9 }).length.toString(),
};

const server = http.createServer((req, res) => {
  const route = routes[req.url] || routes['/health'];
  res.end(String(route()));
});

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  console.log(`blocking-app: pid ${process.pid}, listening on 127.0.0.1:${port}`);
  const get = (path) => http.get({ port, path }, (res) => res.resume());
  setInterval(() => get('/health'), 50);
  setInterval(() => get('/export'), 2000);
  setInterval(() => get('/login'), 3000);
  setInterval(() => get('/report'), 4500);
});
