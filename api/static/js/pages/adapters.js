// Adapters: the tenant's trained LoRA adapters; download (PEFT folder as .tar.gz), merge into
// the base (a worker task; its status is polled, the merged model downloads when it is done),
// delete.

import { api, download, listAll } from "../api.js";
import {
  cell,
  el,
  errorBox,
  fmtBytes,
  fmtNumber,
  plainError,
  replace,
  statusBadge,
  table,
  timeEl,
  toast,
} from "../ui.js";

const MERGE_POLL_MS = 3000;

export function render(root) {
  const list = el("div", { class: "table-holder" });
  replace(
    root,
    el("div", { class: "page-head" }, el("h1", {}, "Adapters")),
    el(
      "p",
      { class: "muted" },
      "Each archive holds a PEFT folder: load it with ",
      el("code", {}, 'PeftModel.from_pretrained(base, "adapter")'),
      ".",
    ),
    list,
  );
  let closed = false;
  let timer = null;
  const mergeCells = new Map(); // adapter id -> the row's "Merged model" cell body

  async function refresh() {
    mergeCells.clear();
    try {
      const adapters = await listAll("/v1/adapters", { max: 1000 });
      if (closed) return;
      replace(
        list,
        table({
          caption: "Trained adapters, newest first",
          columns: [
            { label: "Name" },
            { label: "Base model" },
            { label: "Job" },
            { label: "Eval loss before → after" },
            { label: "Rank / alpha" },
            { label: "Created" },
            { label: "Merged model" },
            { label: "Actions" },
          ],
          rows: adapters.map(row),
          empty: "No adapters yet: they appear when a job succeeds.",
          className: "responsive adapters",
        }),
      );
      refreshMerges();
    } catch (exc) {
      if (!closed) replace(list, errorBox(exc));
    }
  }

  function row(a) {
    const m = a.metrics || {};
    const q = a.qlora || {};
    const mergeBox = el("div", { class: "merges", dataset: { adapter: a.id } }, "–");
    mergeCells.set(a.id, mergeBox);
    return el(
      "tr",
      { dataset: { id: a.id } },
      cell("Name", el("div", { class: "mono break" }, a.name), el("div", { class: "mono muted" }, a.id)),
      cell("Base model", a.base_model),
      cell("Job", el("a", { class: "mono break", href: `#/jobs/${a.fine_tuning_job_id}` }, a.fine_tuning_job_id)),
      cell("Eval loss before → after", `${fmtNumber(m.eval_loss_before)} → ${fmtNumber(m.eval_loss_after)}`),
      cell("Rank / alpha", `${q.rank ?? "–"} / ${q.alpha ?? "–"}`),
      cell("Created", timeEl(a.created_at)),
      cell("Merged model", mergeBox),
      cell(
        "Actions",
        el(
          "div",
          { class: "toolbar tight" },
          el(
            "button",
            {
              type: "button",
              class: "primary",
              "aria-label": `Download adapter ${a.name}`,
              onclick: () => save(a),
            },
            "Download",
          ),
          el(
            "button",
            {
              type: "button",
              class: "secondary",
              "aria-label": `Merge adapter ${a.name} into its base`,
              onclick: () => merge(a),
            },
            "Merge",
          ),
          el(
            "button",
            {
              type: "button",
              class: "danger",
              "aria-label": `Delete adapter ${a.name}`,
              onclick: () => remove(a),
            },
            "Delete",
          ),
        ),
      ),
    );
  }

  async function save(a) {
    try {
      const size = await download(a.download_url, `${a.id}.tar.gz`);
      toast(`Downloaded ${a.id}.tar.gz (${fmtBytes(size)}).`);
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  async function remove(a) {
    if (!window.confirm(`Delete adapter ${a.name}? Its checkpoints go too.`)) return;
    try {
      await api(`/v1/adapters/${encodeURIComponent(a.id)}`, { method: "DELETE" });
      toast(`Deleted ${a.name}.`);
      refresh();
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  async function merge(a) {
    try {
      await api(`/v1/adapters/${encodeURIComponent(a.id)}/merge`, {
        method: "POST",
        body: { dtype: "bfloat16" },
      });
      toast(`Merging ${a.name} into ${a.base_model}…`);
      refreshMerges();
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  // Each adapter's merges; re-read every few seconds while one is queued or running.
  async function refreshMerges() {
    clearTimeout(timer);
    let active = false;
    for (const [adapterId, box] of mergeCells) {
      try {
        const list = await api(`/v1/adapters/${encodeURIComponent(adapterId)}/merges`);
        if (closed) return;
        active ||= list.data.some((m) => m.status === "queued" || m.status === "running");
        replace(box, list.data.length ? list.data.map(mergeItem) : "–");
      } catch (exc) {
        if (!closed) replace(box, errorBox(exc));
      }
    }
    if (active && !closed) timer = setTimeout(refreshMerges, MERGE_POLL_MS);
  }

  function mergeItem(m) {
    return el(
      "div",
      { class: "merge", dataset: { id: m.id, status: m.status } },
      statusBadge(m.status),
      ` ${m.dtype} `,
      m.status === "succeeded"
        ? el(
            "button",
            {
              type: "button",
              class: "link",
              "aria-label": `Download merged model ${m.id}`,
              onclick: () => saveMerge(m),
            },
            "Download model",
          )
        : null,
      m.error ? el("div", { class: "error-text" }, plainError(m.error)) : null,
    );
  }

  async function saveMerge(m) {
    try {
      const size = await download(`/v1/merges/${encodeURIComponent(m.id)}/download`, `${m.id}.tar.gz`);
      toast(`Downloaded ${m.id}.tar.gz (${fmtBytes(size)}).`);
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  refresh();
  return () => {
    closed = true;
    clearTimeout(timer);
  };
}
