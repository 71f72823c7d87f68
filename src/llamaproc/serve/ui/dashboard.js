// The dashboard of `llamaproc serve`: reads GET /api/models, GET /api/workers and GET /api/events, nothing else.
// Every value from the daemon goes into the page as text (textContent), never as markup.
"use strict";

(() => {
  const STREAMS_SHOWN = 12; // recent streams kept on the page
  const TOKENS_SHOWN = 2000; // tokens kept per stream
  const LOG_LINES = 200; // lines of the event log kept
  const POLL_MS = 2000; // in flight and queue counts change without events: read them this often

  const $ = (id) => document.getElementById(id);
  const streams = new Map(); // request id -> {root, head, tokens, model, count, status}
  const layouts = new Map(); // layout key -> colour
  let source = null;
  let poll = null;
  let refreshSoon = null;

  class Unauthorized extends Error {}

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function summary(text) {
    $("summary").textContent = text;
  }

  function feedState(text) {
    $("feed").textContent = text ? `· feed: ${text}` : "";
    $("feed").dataset.state = text;
  }

  // --- colours of worker layouts -------------------------------------------------------------------

  function layoutKey(layout) {
    if (layout === null || layout === undefined) return null;
    if (layout.length === 0) return "coordinator";
    return layout.map((s) => `${s.address}[${s.layers.start}-${s.layers.stop}]`).join(" ");
  }

  function colour(key) {
    if (key === null || key === undefined) return "#1d1d1f";
    if (!layouts.has(key)) {
      // Spread successive layouts around the colour wheel (golden angle), stable for the page's life.
      layouts.set(key, `hsl(${(layouts.size * 137.5 + 210) % 360}, 70%, 38%)`);
      renderLegend();
    }
    return layouts.get(key);
  }

  function swatch(key) {
    const node = el("span", null, "swatch");
    node.style.background = colour(key);
    return node;
  }

  function renderLegend() {
    const legend = $("legend");
    legend.replaceChildren();
    if (layouts.size === 0) return;
    legend.append("Worker layouts: ");
    for (const key of layouts.keys()) {
      const item = el("span");
      item.append(swatch(key), key);
      legend.append(item);
    }
  }

  // --- models and workers ----------------------------------------------------------------------------

  async function getJSON(path) {
    const answer = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (answer.status === 401) throw new Unauthorized();
    if (!answer.ok) throw new Error(`${path}: HTTP ${answer.status}`);
    return answer.json();
  }

  function mib(bytes) {
    return bytes ? `${(bytes / 1048576).toFixed(1)} MiB` : "-";
  }

  // Tokens each model streamed in the last RATE_WINDOW ms, from the event feed (the times they arrived).
  const RATE_WINDOW = 5000;
  const tokenTimes = new Map();

  function countToken(model) {
    if (!tokenTimes.has(model)) tokenTimes.set(model, []);
    tokenTimes.get(model).push(performance.now());
  }

  function tokensPerSecond(model) {
    const times = tokenTimes.get(model) || [];
    const since = performance.now() - RATE_WINDOW;
    while (times.length && times[0] < since) times.shift();
    return times.length ? (times.length / (RATE_WINDOW / 1000)).toFixed(1) : "-";
  }

  function renderModels(data) {
    const rows = data.models.map((m) => {
      const row = el("tr");
      row.dataset.model = m.name;
      const conditions = el("td");
      for (const c of m.conditions) {
        const badge = el("span", c.type, `cond cond-${c.status}`);
        badge.title = `${c.status}: ${c.reason} ${c.message}`.trim();
        conditions.append(badge);
      }
      const layout = el("td");
      if (m.layout === null || m.layout === undefined) {
        layout.textContent = "single process";
      } else {
        const key = layoutKey(m.layout);
        layout.append(swatch(key), key);
        if (m.lostWorkers && m.lostWorkers.length) layout.append(` (lost: ${m.lostWorkers.join(", ")})`);
      }
      const role = (m.roles && m.roles[0]) || { readyReplicas: 0, replicas: 0 };
      const replicas = el("td", `${role.readyReplicas} of ${role.replicas}`, "num");
      replicas.title = (role.replicaStatuses || [])
        .map((r) => `replica ${r.index}: ${r.phase}, pid ${r.pid ?? "-"}, ${r.restarts} restarts`)
        .join("\n");
      const memory = el("td", mib(m.memoryEstimate), "num");
      if (m.lease) {
        memory.append(el("div", `lease ${mib(m.lease.memory)} · ${m.lease.priority}`, "lease"));
        memory.title = `lease ${m.lease.id} on ${m.lease.device}, token ${m.lease.token}`;
      }
      row.append(
        el("td", m.name),
        el("td", m.phase, `phase phase-${m.phase}`),
        conditions,
        el("td", m.loaded ? `yes (${m.pid})` : "no"),
        replicas,
        el("td", `${m.inFlight} of ${m.parallel * role.replicas} slots`, "num"),
        el("td", m.queued, "num"),
        el("td", tokensPerSecond(m.name), "num"),
        memory,
        layout,
      );
      return row;
    });
    $("models").tBodies[0].replaceChildren(...rows);
    const count = data.models.length;
    summary(data.draining ? "the daemon is shutting down" : `${count} model${count === 1 ? "" : "s"}`);
  }

  function renderWorkers(data) {
    const body = $("workers").tBodies[0];
    if (data.workers.length === 0) {
      const row = el("tr");
      const cell = el("td", "No rpc worker.", "empty");
      cell.colSpan = 7;
      row.append(cell);
      body.replaceChildren(row);
      return;
    }
    body.replaceChildren(
      ...data.workers.map((w) => {
        const row = el("tr");
        row.dataset.worker = w.id;
        const layers = w.layers ? `${w.layers.start}-${w.layers.stop}` : "-";
        row.append(
          el("td", w.id),
          el("td", w.address),
          el("td", w.source),
          el("td", w.state),
          el("td", w.model || "-"),
          el("td", layers),
          el("td", `${w.heartbeat_age.toFixed(1)} s ago`, "num"),
        );
        return row;
      }),
    );
  }

  async function refresh() {
    try {
      const [models, workers] = await Promise.all([getJSON("/api/models"), getJSON("/api/workers")]);
      renderModels(models);
      renderWorkers(workers);
      return true;
    } catch (error) {
      if (error instanceof Unauthorized) {
        showLogin();
      } else {
        summary(`cannot reach the daemon (${error.message})`);
      }
      return false;
    }
  }

  function refreshLater() {
    if (refreshSoon === null) {
      refreshSoon = setTimeout(() => {
        refreshSoon = null;
        refresh();
      }, 200);
    }
  }

  // --- the event feed --------------------------------------------------------------------------------

  function log(text) {
    const list = $("log");
    list.prepend(el("li", `${new Date().toLocaleTimeString()}  ${text}`));
    while (list.childElementCount > LOG_LINES) list.lastElementChild.remove();
  }

  function streamOf(data) {
    let stream = streams.get(data.request);
    if (stream) return stream;
    const root = el("div", null, "stream");
    root.dataset.request = data.request;
    root.dataset.model = data.model;
    const head = el("div", null, "stream-head");
    const tokens = el("div", null, "tokens");
    root.append(head, tokens);
    stream = { root, head, tokens, model: data.model, count: 0, status: "streaming" };
    streams.set(data.request, stream);
    $("no-streams")?.remove();
    $("streams").prepend(root);
    while (streams.size > STREAMS_SHOWN) {
      const [oldest] = streams.keys();
      streams.get(oldest).root.remove();
      streams.delete(oldest);
    }
    return stream;
  }

  function describe(stream, request) {
    stream.head.textContent = `${stream.model} · ${request} · ${stream.count} tokens · ${stream.status}`;
  }

  function trim(stream) {
    while (stream.tokens.childElementCount > TOKENS_SHOWN) stream.tokens.firstElementChild.remove();
  }

  const handlers = {
    subscribed() {
      feedState("live");
    },
    token(data) {
      const stream = streamOf(data);
      countToken(data.model);
      const span = el("span", data.text, "token");
      span.style.color = colour(data.layout);
      span.style.borderBottomColor = data.layout === null ? "transparent" : colour(data.layout);
      span.title = data.layout === null ? "single process" : `layout: ${data.layout}`;
      if (data.layout !== null) span.dataset.layout = data.layout;
      stream.tokens.append(span);
      stream.count += 1;
      trim(stream);
      describe(stream, data.request);
    },
    resume(data) {
      const stream = streamOf(data);
      const lost = data.reshard.lost.join(", ") || "none";
      const marker = el("span", `⟲ reshard after ${data.reshard.after_tokens} tokens (lost ${lost})`, "reshard");
      marker.title = `new layout: ${data.layout}; ${data.reshard.seconds.toFixed(2)} s to the next token`;
      stream.tokens.append(marker);
      log(`${data.model}: stream ${data.request} resumed on ${data.layout}`);
    },
    end(data) {
      const stream = streams.get(data.request);
      if (!stream) return;
      stream.status = data.status;
      stream.root.classList.add(`stream-${data.status}`);
      describe(stream, data.request);
    },
    model(data) {
      log(`model ${data.model}: ${data.event}`);
      refreshLater();
    },
    worker(data) {
      log(`worker ${data.address}: ${data.change}${data.model ? ` (${data.model})` : ""}`);
      refreshLater();
    },
    reshard(data) {
      log(`model ${data.model}: resharded, lost ${data.lost.join(", ")}`);
      refreshLater();
    },
    dropped(data) {
      const notice = $("dropped");
      notice.hidden = false;
      notice.textContent = `${data.count} events were dropped: this page read the feed too slowly.`;
      log(`${data.count} events dropped`);
    },
  };

  function connect() {
    if (source !== null) source.close();
    source = new EventSource("/api/events");
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => handle(JSON.parse(event.data)));
    }
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (a session that ended, too many subscribers) or gone: see why, then try again.
        feedState("stopped; retrying");
        refresh().then((ok) => {
          if (ok) setTimeout(connect, 3000);
        });
      } else {
        feedState("reconnecting");
      }
    };
  }

  // --- login -------------------------------------------------------------------------------------------

  function showLogin(message) {
    if (source !== null) source.close();
    source = null;
    clearInterval(poll);
    poll = null;
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    summary("log in to see the daemon");
    feedState("");
    $("key").focus();
  }

  async function login(event) {
    event.preventDefault();
    const form = event.target;
    const answer = await fetch(form.action, { method: "POST", body: new URLSearchParams(new FormData(form)) });
    if (!answer.ok) {
      let message = `HTTP ${answer.status}`;
      try {
        message = (await answer.json()).error.message;
      } catch (_) {
        // not JSON: keep the status
      }
      $("login-error").textContent = message;
      return;
    }
    form.reset();
    sessionStorage.setItem("llamaproc-login", "1");
    start();
  }

  async function start() {
    if (!(await refresh())) return;
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = sessionStorage.getItem("llamaproc-login") !== "1";
    if (poll === null) poll = setInterval(refresh, POLL_MS);
    connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("submit", () => sessionStorage.removeItem("llamaproc-login"));
    start();
  });
})();
