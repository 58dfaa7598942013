// The dashboard's SSE client (api/static/js/api.js) under Node's test runner, with a scripted
// fetch(): events split across chunks and CRLF line ends, a dropped connection resumed with
// Last-Event-ID, `done` ending the stream, the Bearer header on every request.
// Run by tests/dashboard/test_event_stream_client.py.

import assert from "node:assert/strict";
import { test } from "node:test";

const store = new Map();
globalThis.sessionStorage = {
  getItem: (k) => (store.has(k) ? store.get(k) : null),
  setItem: (k, v) => store.set(k, String(v)),
  removeItem: (k) => store.delete(k),
};

const { followEvents, parseEventBlock, setKey } = await import("../../api/static/js/api.js");

function streamOf(chunks) {
  const encoder = new TextEncoder();
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(encoder.encode(c));
      controller.close();
    },
  });
}

test("parseEventBlock reads id, event and multi-line data, and skips comments", () => {
  assert.deepEqual(parseEventBlock('id: 7\nevent: metrics\ndata: {"a":\ndata: 1}'), {
    id: "7",
    event: "metrics",
    data: '{"a":\n1}',
  });
  assert.equal(parseEventBlock(": keepalive"), null);
  assert.equal(parseEventBlock("event: done\ndata: {}").event, "done");
});

test("followEvents resumes after a drop with Last-Event-ID and stops at done", async () => {
  setKey("qlsk-test");
  const calls = [];
  const answers = [
    // First connection: one event split across chunks (CRLF), a keepalive, then a drop.
    [
      'id: 1\r\nevent: metrics\r\ndata: {"n":\r',
      "\ndata: 1}\r\n\r\n: keepalive\n\n",
      'id: 2\nevent: message\ndata: {"n": 2}\n\n',
    ],
    // Second: the rest, then `done`.
    ['id: 3\nevent: message\ndata: {"n": 3}\n\n', 'event: done\ndata: {"status": "succeeded"}\n\n'],
  ];
  globalThis.fetch = async (url, init) => {
    calls.push({ url, headers: { ...init.headers } });
    const chunks = answers.shift();
    assert.ok(chunks, "no more than two connections");
    return new Response(streamOf(chunks), {
      status: 200,
      headers: { "content-type": "text/event-stream" },
    });
  };
  const seen = [];
  const status = await new Promise((resolve) => {
    followEvents("ftjob-abc", {
      onEvent: (ev) => seen.push([ev.id, ev.event, JSON.parse(ev.data).n]),
      onDone: resolve,
    });
  });
  assert.equal(status, "succeeded");
  assert.deepEqual(seen, [
    ["1", "metrics", 1],
    ["2", "message", 2],
    ["3", "message", 3],
  ]);
  assert.equal(calls.length, 2);
  assert.equal(calls[0].url, "/v1/fine_tuning/jobs/ftjob-abc/events");
  for (const c of calls) {
    assert.equal(c.headers.Authorization, "Bearer qlsk-test");
    assert.equal(c.headers.Accept, "text/event-stream");
  }
  assert.equal(calls[0].headers["Last-Event-ID"], undefined);
  assert.equal(calls[1].headers["Last-Event-ID"], "2");
});

test("followEvents gives up on 404 and stops when asked", async () => {
  let n = 0;
  globalThis.fetch = async () => {
    n += 1;
    return new Response(JSON.stringify({ error: { message: "no such job", code: "not_found" } }), {
      status: 404,
    });
  };
  const states = [];
  await new Promise((resolve) => {
    followEvents("ftjob-gone", {
      onEvent: () => assert.fail("no event"),
      onDone: () => assert.fail("no done"),
      onState: (s) => {
        states.push(s);
        if (s === "closed") resolve();
      },
    });
  });
  assert.equal(n, 1);
  assert.equal(states.at(-1), "closed");
});
