// The dashboard's entry point: sign-in, the hash router (`#/jobs`, `#/jobs/<id>`, `#/new`,
// `#/datasets`, `#/adapters`) and sign-out. The API key never appears in a URL.

import { api, clearKey, getKey, setKey, setUnauthorizedHandler } from "./api.js";
import { el, replace, toast } from "./ui.js";
import * as adaptersPage from "./pages/adapters.js";
import * as datasetsPage from "./pages/datasets.js";
import * as jobPage from "./pages/job.js";
import * as jobsPage from "./pages/jobs.js";
import * as newJobPage from "./pages/newjob.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let cleanup = null;

const ROUTES = [
  { pattern: /^\/jobs\/([A-Za-z0-9_-]+)$/, page: jobPage, nav: "jobs", title: "Job" },
  { pattern: /^\/jobs$/, page: jobsPage, nav: "jobs", title: "Jobs" },
  { pattern: /^\/new$/, page: newJobPage, nav: "new", title: "New job" },
  { pattern: /^\/datasets$/, page: datasetsPage, nav: "datasets", title: "Datasets" },
  { pattern: /^\/adapters$/, page: adaptersPage, nav: "adapters", title: "Adapters" },
];

function leavePage() {
  if (cleanup) {
    try {
      cleanup();
    } catch (exc) {
      console.warn("page cleanup failed", exc);
    }
  }
  cleanup = null;
}

function route() {
  leavePage();
  if (!getKey()) {
    showSignIn();
    return;
  }
  nav.hidden = false;
  const [path, query] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  const match = ROUTES.map((r) => [r, path.match(r.pattern)]).find(([, m]) => m);
  if (!match) {
    location.replace("#/jobs");
    return;
  }
  const [r, m] = match;
  for (const a of nav.querySelectorAll("a[data-page]")) {
    if (a.dataset.page === r.nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${r.title} · QLoRA fine-tuning`;
  main.dataset.page = r.nav;
  replace(main);
  cleanup = r.page.render(main, m.slice(1), new URLSearchParams(query || "")) || null;
}

function showSignIn(message) {
  nav.hidden = true;
  main.dataset.page = "sign-in";
  document.title = "Sign in · QLoRA fine-tuning";
  const input = el("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "qlsk-…",
  });
  const error = el("p", { class: "form-error", role: "alert" }, message || "");
  const button = el("button", { type: "submit" }, "Sign in");
  const form = el(
    "form",
    { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    el("h1", { id: "sign-in-title" }, "Sign in"),
    el(
      "p",
      { class: "muted" },
      "Paste your organization's API key. It is kept in this tab only (session storage) " +
        "and sent as a Bearer header.",
    ),
    el("label", { for: "api-key" }, "API key"),
    input,
    error,
    button,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    error.textContent = "";
    try {
      await api("/v1/models", { key });
      setKey(key);
      if (!location.hash || location.hash === "#") location.hash = "#/jobs";
      route();
    } catch (exc) {
      error.textContent =
        exc.status === 401 ? "That key was not accepted." : exc.message || String(exc);
    } finally {
      button.disabled = false;
    }
  });
  replace(main, form);
  input.focus();
}

function signOut(message) {
  leavePage();
  clearKey();
  showSignIn(message);
}

document.getElementById("sign-out").addEventListener("click", () => {
  signOut();
  toast("Signed out.");
});
setUnauthorizedHandler(() => {
  if (getKey()) signOut("Your key was not accepted any more; sign in again.");
});
window.addEventListener("hashchange", route);
route();
