// A small HTTP service for the overhead benchmark: answers every request with a little JSON.
// Prints its port on stdout once listening.
'use strict';
const http = require('http');

const server = http.createServer((req, res) => {
  const body = JSON.stringify({ path: req.url, time: Date.now(), items: [1, 2, 3] });
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(body);
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
