// Node.js WebSocket clients (the `ws` package) against a running pushletd.
// Run by tests/integration/test_ws_node.py, which starts pushletd and sets
//   PUSHLET_URL=http://127.0.0.1:PORT
// Every wait is bounded.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decode } from '@msgpack/msgpack';
import WebSocket from 'ws';

const BASE = process.env.PUSHLET_URL;
if (!BASE) throw new Error('PUSHLET_URL is not set (run through test_ws_node.py)');
const WS_BASE = BASE.replace(/^http/, 'ws');
const SCALE = Number(process.env.PUSHLET_TEST_TIME_SCALE || '1');
const T = (ms) => ms * SCALE;
const TS_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const ID_RE = /^[0-9a-z]{1,13}-\d{1,20}$/; // EPOCH-SEQ, the sequence per topic
const seqOf = (id) => BigInt(id.slice(id.indexOf('-') + 1));

// A "subscribed" reply for `topic`, carrying the position the subscription starts at.
async function expectSubscribed(c, topic) {
  const r = await c.next();
  assert.deepEqual(Object.keys(r).sort(), ['event', 'id', 'topic']);
  assert.equal(r.event, 'subscribed');
  assert.equal(r.topic, topic);
  assert.match(r.id, ID_RE);
  return r;
}

/** A WebSocket whose incoming messages are queued; next() waits (bounded) for one. */
class Client {
  constructor(path, { protocols, msgpack = false, perMessageDeflate = true } = {}) {
    this.msgpack = msgpack;
    this.queue = [];
    this.waiters = [];
    this.closed = null;
    this.ws = new WebSocket(WS_BASE + path, protocols, { perMessageDeflate, handshakeTimeout: T(10000) });
    this.ws.binaryType = 'nodebuffer';
    this.ws.on('message', (data, isBinary) => {
      assert.ok(isBinary, 'server messages are binary frames');
      const obj = this.msgpack ? decode(data) : JSON.parse(data.toString('utf8'));
      this.push({ obj });
    });
    this.ws.on('close', (code, reason) => {
      this.closed = { code, reason: reason.toString() };
      this.push({ closed: this.closed });
    });
    this.ws.on('error', (err) => this.push({ error: err }));
  }

  push(item) {
    const w = this.waiters.shift();
    if (w) w(item);
    else this.queue.push(item);
  }

  open() {
    return withTimeout(new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    }), T(10000), 'open');
  }

  async next(ms = 10000) {
    const item = this.queue.length ? this.queue.shift()
      : await withTimeout(new Promise((r) => this.waiters.push(r)), T(ms), 'a message');
    if (item.error) throw item.error;
    if (item.closed) throw new Error(`closed: ${item.closed.code} ${item.closed.reason}`);
    return item.obj;
  }

  send(obj) { this.ws.send(JSON.stringify(obj)); }

  async close() {
    if (this.ws.readyState === WebSocket.CLOSED) return;
    const done = new Promise((r) => this.ws.once('close', r));
    this.ws.close(1000, 'bye');
    await withTimeout(done, T(5000), 'close');
  }
}

function withTimeout(p, ms, what) {
  let timer;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms); }),
  ]);
}

async function publish(topic, data, event) {
  const q = new URLSearchParams({ topic });
  if (event) q.set('event', event);
  const r = await fetch(`${BASE}/publish?${q}`, { method: 'POST', body: data, signal: AbortSignal.timeout(T(10000)) });
  assert.equal(r.status, 200, `publish answered ${r.status}`);
  const j = await r.json();
  assert.match(j.id, ID_RE);
  return j.id;
}

async function connected(c, topics = []) {
  await c.open();
  assert.deepEqual(await c.next(), { event: 'connected', data: 'Connection established' });
  for (const t of topics) await expectSubscribed(c, t);
}

test('subscribe by command, messages in order with ids and timestamps', { timeout: T(30000) }, async () => {
  const c = new Client('/ws');
  await connected(c);
  c.send({ action: 'subscribe', topic: 'node-a' });
  await expectSubscribed(c, 'node-a');
  const ids = [];
  for (let i = 0; i < 100; i++) ids.push(await publish('node-a', `msg-${i}`, i % 2 ? 'odd' : undefined));
  for (let i = 0; i < 100; i++) {
    const m = await c.next();
    assert.deepEqual(Object.keys(m).sort(), ['data', 'event', 'id', 'timestamp', 'topic']);
    assert.equal(m.topic, 'node-a');
    assert.equal(m.data, `msg-${i}`);
    assert.equal(m.event, i % 2 ? 'odd' : 'message');
    assert.equal(m.id, ids[i]);
    assert.match(m.timestamp, TS_RE);
    assert.ok(Math.abs(Date.now() - Date.parse(m.timestamp)) < T(10000), m.timestamp);
  }
  const nums = ids.map(seqOf);
  for (let i = 1; i < nums.length; i++) assert.ok(nums[i] > nums[i - 1], 'ids increase');
  c.send({ action: 'ping' });
  assert.deepEqual(await c.next(), { event: 'pong' });
  await c.close();
});

test('unsubscribe stops delivery', { timeout: T(30000) }, async () => {
  const c = new Client('/ws?topic=node-u&topic=node-keep');
  await connected(c, ['node-u', 'node-keep']);
  const first = await publish('node-u', 'before');
  assert.equal((await c.next()).id, first);
  c.send({ action: 'unsubscribe', topic: 'node-u' });
  assert.deepEqual(await c.next(), { event: 'unsubscribed', topic: 'node-u' });
  await publish('node-u', 'after unsubscribe');
  const sentinel = await publish('node-keep', 'sentinel');
  const m = await c.next();
  assert.equal(m.id, sentinel, `got ${JSON.stringify(m)} instead of the sentinel`);
  assert.equal(m.topic, 'node-keep');
  c.send({ action: 'unsubscribe', topic: 'node-u' });
  const err = await c.next();
  assert.equal(err.event, 'error');
  assert.equal(err.reason, 'not_subscribed');
  assert.equal(err.topic, 'node-u');
  await c.close();
});

test('msgpack via subprotocol, decoded by @msgpack/msgpack', { timeout: T(30000) }, async () => {
  const c = new Client('/ws?topic=node-mp', { protocols: ['pushlet.json', 'pushlet.msgpack'], msgpack: true, perMessageDeflate: false });
  await connected(c, ['node-mp']);
  assert.equal(c.ws.protocol, 'pushlet.msgpack');
  const text = 'caf\u00e9 \u2603';
  const bin = Buffer.from([0x62, 0x69, 0x6e, 0xff, 0xfe, 0x00]);
  const id1 = await publish('node-mp', text, 'greet');
  const id2 = await publish('node-mp', bin);
  const m1 = await c.next();
  assert.deepEqual({ ...m1, timestamp: undefined }, { topic: 'node-mp', event: 'greet', data: text, id: id1, timestamp: undefined });
  assert.match(m1.timestamp, TS_RE);
  const m2 = await c.next();
  assert.equal(m2.id, id2);
  assert.ok(m2.data instanceof Uint8Array, 'non-UTF-8 data travels as msgpack bin');
  assert.deepEqual(Buffer.from(m2.data), bin);
  c.send({ action: 'ping' });
  assert.deepEqual(await c.next(), { event: 'pong' });
  await c.close();
});

test('msgpack via ?format=msgpack', { timeout: T(30000) }, async () => {
  const c = new Client('/ws?topic=node-mq&format=msgpack', { msgpack: true, perMessageDeflate: false });
  await connected(c, ['node-mq']);
  assert.equal(c.ws.protocol, '');
  const id = await publish('node-mq', 'x'.repeat(1000));
  const m = await c.next();
  assert.equal(m.id, id);
  assert.equal(m.data, 'x'.repeat(1000));
  await c.close();
});

test('permessage-deflate negotiated by ws; large messages intact', { timeout: T(30000) }, async () => {
  const c = new Client('/ws?topic=node-z');
  await connected(c, ['node-z']);
  assert.match(c.ws.extensions, /permessage-deflate/);
  const big = 'compressible '.repeat(5000);
  const id = await publish('node-z', big);
  const m = await c.next();
  assert.equal(m.id, id);
  assert.equal(m.data, big);
  // a long command is compressed by ws on the way in
  c.send({ action: 'subscribe', topic: 'node-z2', padding: 'p'.repeat(4000) });
  await expectSubscribed(c, 'node-z2');
  await c.close();
});

test('ping frames answered; server close code on bad input', { timeout: T(30000) }, async () => {
  const c = new Client('/ws');
  await connected(c);
  const pong = withTimeout(new Promise((r) => c.ws.once('pong', r)), T(5000), 'pong');
  c.ws.ping(Buffer.from('node ping'));
  assert.equal((await pong).toString(), 'node ping');
  c.send({ action: 'bogus' });
  const err = await c.next();
  assert.equal(err.event, 'error');
  assert.equal(err.reason, 'unknown_action');
  // a text message that is not UTF-8: the server closes with 1007
  c.ws.send(Buffer.from([0x7b, 0xff, 0x7d]), { binary: false });
  await assert.rejects(c.next(), /closed: 1007/);
  assert.equal(c.closed.code, 1007);
});
