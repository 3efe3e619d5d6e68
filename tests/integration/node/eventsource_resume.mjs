// A real EventSource client (the `eventsource` npm package) that reconnects by itself.
// Run by tests/integration/test_resume_eventsource.py, which puts a connection-cutting proxy
// between it and pushletd. Environment:
//   ES_URL         the stream URL (through the proxy)
//   ES_END         data of the message that ends the run (default END)
//   ES_TIMEOUT_MS  hard bound of the whole run (default 60000)
// Prints one JSON object per line on stdout: every open, error, connected, gap and message as
// this EventSource saw it (lastEventId is the ID it will send as Last-Event-ID). Exits 0 after
// the END message, 2 on timeout.
import { EventSource } from 'eventsource';

const url = process.env.ES_URL;
if (!url) throw new Error('ES_URL is not set (run through test_resume_eventsource.py)');
const END = process.env.ES_END || 'END';
const TIMEOUT_MS = Number(process.env.ES_TIMEOUT_MS || '60000');

const out = (obj) => process.stdout.write(JSON.stringify({ t: Date.now(), ...obj }) + '\n');

const es = new EventSource(url);
const timer = setTimeout(() => {
  out({ type: 'timeout', readyState: es.readyState });
  es.close();
  process.exit(2);
}, TIMEOUT_MS);

es.onopen = () => out({ type: 'open' });
es.onerror = (e) => out({ type: 'error', message: String(e?.message ?? ''), code: e?.code ?? null,
  readyState: es.readyState });
for (const type of ['connected', 'gap']) {
  es.addEventListener(type, (e) => out({ type, id: e.lastEventId, data: e.data }));
}
es.onmessage = (e) => {
  out({ type: 'message', id: e.lastEventId, data: e.data });
  if (e.data === END) {
    clearTimeout(timer);
    es.close();
    process.exit(0);
  }
};
