// The API client: the tenant's key lives in sessionStorage and travels only as a Bearer
// header (never in a URL). Errors come back in OpenAI's shape and become ApiError.

const KEY_NAME = "qlora.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `the service answered ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
    this.details = err;
  }
}

// Called on a 401 so the app can return to the sign-in page.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

function authHeaders(extra) {
  return Object.assign({ Authorization: `Bearer ${getKey()}` }, extra || {});
}

async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  const error = new ApiError(resp.status, body);
  if (resp.status === 401) onUnauthorized(error);
  return error;
}

export async function api(path, { method = "GET", body, signal, key, headers: extra } = {}) {
  const headers = Object.assign(
    key ? { Authorization: `Bearer ${key}` } : authHeaders(),
    extra || {},
  );
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, { error: { message: "the service cannot be reached" } });
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp.status === 204 ? null : resp.json();
}

// Every page of a list endpoint (`after` cursor), up to `max` items.
export async function listAll(path, { max = 500, limit = 100, signal } = {}) {
  const out = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(
      `${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`,
      { signal },
    );
    out.push(...page.data);
    if (!page.has_more || out.length >= max || page.data.length === 0) return out;
    after = page.data[page.data.length - 1].id;
  }
}

// Upload with progress: fetch() cannot report upload progress, XMLHttpRequest can.
export function uploadFile(file, purpose, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/files");
    xhr.setRequestHeader("Authorization", `Bearer ${getKey()}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (ev) => {
      if (ev.lengthComputable) onProgress(ev.loaded, ev.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(xhr.response);
        return;
      }
      const error = new ApiError(xhr.status, xhr.response);
      if (xhr.status === 401) onUnauthorized(error);
      reject(error);
    });
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, { error: { message: "the upload was interrupted" } })),
    );
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

// A download that needs the Bearer header: fetched as a blob, saved through an object URL.
export async function download(path, filename) {
  let resp;
  try {
    resp = await fetch(path, { headers: authHeaders() });
  } catch {
    throw new ApiError(0, { error: { message: "the service cannot be reached" } });
  }
  if (!resp.ok) throw await errorOf(resp);
  const blob = await resp.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.size;
}

// One server-sent event block ("id: …\nevent: …\ndata: …") as {id, event, data}.
export function parseEventBlock(block) {
  const out = { id: null, event: "message", data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") out.id = value;
    else if (field === "event") out.event = value;
    else if (field === "data") out.data.push(value);
  }
  if (out.id === null && out.data.length === 0) return null;
  return { id: out.id, event: out.event, data: out.data.join("\n") };
}

/**
 * Follows a job's `text/event-stream` with fetch() (EventSource cannot send a Bearer header)
 * and reconnects with `Last-Event-ID` after a dropped connection, so no event is lost or
 * repeated. `onEvent({id, event, data})` gets every event; `onDone(status)` the final one.
 * Returns a function that stops the stream.
 */
export function followEvents(jobId, { onEvent, onDone, onState = () => {}, lastEventId = null }) {
  const controller = new AbortController();
  let last = lastEventId;
  let delay = 500;
  let stopped = false;

  async function once() {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (last !== null) headers["Last-Event-ID"] = String(last);
    const resp = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events`, {
      headers,
      signal: controller.signal,
      cache: "no-store",
    });
    if (!resp.ok) throw await errorOf(resp);
    onState("live");
    delay = 500;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false; // closed without `done`: reconnect
      buffer += value;
      // CRLF or CR line ends become LF; a CR at the very end may be half of a CRLF.
      const held = buffer.endsWith("\r") ? "\r" : "";
      buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const ev = parseEventBlock(block);
        if (ev === null) continue;
        if (ev.event === "done") {
          let status = null;
          try {
            status = JSON.parse(ev.data).status;
          } catch {
            status = null;
          }
          onDone(status);
          return true;
        }
        if (ev.id !== null) last = ev.id;
        onEvent(ev);
      }
      buffer += held;
    }
  }

  (async () => {
    while (!stopped) {
      try {
        if (await once()) break;
      } catch (exc) {
        if (stopped || exc.name === "AbortError") break;
        if (exc instanceof ApiError && [401, 403, 404].includes(exc.status)) {
          onState("closed");
          break;
        }
        if (exc instanceof ApiError && exc.status === 429) delay = Math.max(delay, 5000);
      }
      if (stopped) break;
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10_000);
    }
    onState("closed");
  })();

  return () => {
    stopped = true;
    controller.abort();
  };
}
