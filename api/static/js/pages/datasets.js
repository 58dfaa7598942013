// Datasets: upload a JSONL file with a progress bar, see the per-line problems the API reports,
// and the recorded files with their statistics.

import { api, download, listAll, uploadFile } from "../api.js";
import {
  cell,
  el,
  errorBox,
  fmtBytes,
  fmtInt,
  plainError,
  progressBar,
  replace,
  setProgress,
  table,
  timeEl,
  toast,
} from "../ui.js";

export function render(root) {
  const fileInput = el("input", {
    id: "dataset-file",
    name: "file",
    type: "file",
    accept: ".jsonl,.json,application/jsonl,application/json,text/plain",
    required: true,
  });
  const bar = progressBar(0, 1, "Upload progress");
  const barText = el("span", { id: "upload-progress-text", class: "muted" });
  const barRow = el("div", { class: "upload-progress", hidden: true }, bar, barText);
  const result = el("div", { id: "upload-result", "aria-live": "polite" });
  const submit = el("button", { type: "submit" }, "Upload");
  const form = el(
    "form",
    { class: "card upload", "aria-labelledby": "upload-h" },
    el("h2", { id: "upload-h" }, "Upload a dataset"),
    el(
      "p",
      { class: "muted" },
      "JSONL, one example a line: chat ",
      el("code", {}, "messages"),
      ", ",
      el("code", {}, "prompt"),
      "/",
      el("code", {}, "completion"),
      ", Alpaca ",
      el("code", {}, "instruction"),
      "/",
      el("code", {}, "output"),
      ", or ",
      el("code", {}, "text"),
      ". Every line is checked while it uploads.",
    ),
    el("label", { for: "dataset-file" }, "JSONL file"),
    el("div", { class: "row" }, fileInput, submit),
    barRow,
    result,
  );
  const list = el("div", { class: "table-holder" });
  replace(
    root,
    el("div", { class: "page-head" }, el("h1", {}, "Datasets")),
    form,
    el(
      "section",
      { class: "card", "aria-labelledby": "files-h" },
      el("h2", { id: "files-h" }, "Files"),
      list,
    ),
  );

  let closed = false;

  async function refresh() {
    try {
      const files = await listAll("/v1/files", { max: 1000 });
      if (closed) return;
      replace(
        list,
        table({
          caption: "Uploaded files, newest first",
          columns: [
            { label: "File" },
            { label: "Purpose" },
            { label: "Format" },
            { label: "Rows" },
            { label: "Size" },
            { label: "Characters" },
            { label: "Row length (chars)" },
            { label: "Uploaded" },
            { label: "Actions" },
          ],
          rows: files.map(fileRow),
          empty: "No files yet: upload one above.",
          className: "responsive files",
        }),
      );
    } catch (exc) {
      if (!closed) replace(list, errorBox(exc));
    }
  }

  function fileRow(f) {
    const s = f.stats || {};
    return el(
      "tr",
      { dataset: { id: f.id } },
      cell("File", el("div", { class: "break" }, f.filename), el("div", { class: "mono muted" }, f.id)),
      cell("Purpose", f.purpose),
      cell("Format", f.format),
      cell("Rows", fmtInt(f.rows)),
      cell("Size", el("span", { class: "nowrap" }, fmtBytes(f.bytes))),
      cell("Characters", fmtInt(s.chars), s.messages ? ` (${fmtInt(s.messages)} messages)` : ""),
      cell(
        "Row length (chars)",
        s.mean_row_chars !== undefined
          ? `${fmtInt(s.min_row_chars)}–${fmtInt(s.max_row_chars)}, mean ${s.mean_row_chars}`
          : "–",
      ),
      cell("Uploaded", timeEl(f.created_at)),
      cell(
        "Actions",
        el(
          "div",
          { class: "toolbar tight" },
          f.purpose === "fine-tune"
            ? el(
                "a",
                {
                  class: "button secondary",
                  href: `#/new?file=${encodeURIComponent(f.id)}`,
                  "aria-label": `Train on ${f.filename}`,
                },
                "Train",
              )
            : null,
          el(
            "button",
            {
              type: "button",
              class: "secondary",
              "aria-label": `Download ${f.filename}`,
              onclick: () => saveFile(f),
            },
            "Download",
          ),
          el(
            "button",
            {
              type: "button",
              class: "danger",
              "aria-label": `Delete ${f.filename}`,
              onclick: () => remove(f),
            },
            "Delete",
          ),
        ),
      ),
    );
  }

  async function saveFile(f) {
    try {
      await download(`/v1/files/${encodeURIComponent(f.id)}/content`, f.filename);
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  async function remove(f) {
    if (!window.confirm(`Delete ${f.filename} (${f.id})?`)) return;
    try {
      await api(`/v1/files/${encodeURIComponent(f.id)}`, { method: "DELETE" });
      toast(`Deleted ${f.filename}.`);
      refresh();
    } catch (exc) {
      toast(exc.message, "error");
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = fileInput.files[0];
    if (!file) return;
    submit.disabled = true;
    barRow.hidden = false;
    bar.classList.remove("refused");
    setProgress(bar, 0, Math.max(1, file.size));
    barText.textContent = `0 of ${fmtBytes(file.size)}`;
    replace(result);
    try {
      const obj = await uploadFile(file, "fine-tune", (loaded, total) => {
        setProgress(bar, loaded, total);
        barText.textContent = `${fmtBytes(loaded)} of ${fmtBytes(total)}`;
      });
      setProgress(bar, 1, 1);
      barText.textContent = `${fmtBytes(file.size)} uploaded and checked`;
      replace(
        result,
        el(
          "div",
          { class: "ok-box", role: "status" },
          `${obj.filename} is ready: ${obj.id}, ${obj.format} format, ${fmtInt(obj.rows)} rows, ${fmtBytes(obj.bytes)}.`,
        ),
      );
      form.reset();
      refresh();
    } catch (exc) {
      bar.classList.add("refused");
      barText.textContent = "Upload refused: nothing was stored";
      replace(result, problems(exc));
    } finally {
      submit.disabled = false;
    }
  });

  refresh();
  return () => {
    closed = true;
  };
}

// The API's per-line report: {error: {code: "invalid_file", lines: [{line, reason}]}}.
function problems(exc) {
  const lines = (exc.details && exc.details.lines) || [];
  if (!lines.length) return errorBox(exc);
  return el(
    "div",
    { class: "error-box", role: "alert", id: "upload-errors" },
    el(
      "p",
      {},
      exc.code === "invalid_file"
        ? `The file is not valid JSONL for fine-tuning; nothing was stored. ${countOf(exc)}`
        : plainError(exc),
    ),
    table({
      caption: "Problems by line, as the service reported them",
      columns: [{ label: "Line" }, { label: "Problem" }],
      rows: lines.map((l) =>
        el("tr", {}, cell("Line", l.line ? String(l.line) : "–"), cell("Problem", l.reason)),
      ),
      className: "compact",
    }),
  );
}

// "invalid JSONL (12 problem(s)); line 2: …": the API lists the first problems only.
function countOf(exc) {
  const m = /\((\d+) problem/.exec(exc.message || "");
  const lines = (exc.details && exc.details.lines) || [];
  if (!m) return "";
  const total = Number(m[1]);
  return total > lines.length
    ? `${total} problems; the first ${lines.length} are listed.`
    : `${total} problem(s):`;
}
