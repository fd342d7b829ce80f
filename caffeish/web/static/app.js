// caffeish serve: the little the pages need. No framework.
"use strict";

function loadNetPicture() {
  const box = document.getElementById("net-picture");
  if (!box) return;
  fetch(box.dataset.src).then(r => {
    if (!r.ok) return r.text().then(t => { throw new Error(t.slice(0, 300)); });
    return r.text();
  }).then(svg => {
    box.innerHTML = svg;  // Graphviz's SVG: text XML-escaped, links to our own layer pages
    box.classList.add("loaded");
  }).catch(e => { box.textContent = "The picture could not be drawn: " + e.message; box.classList.add("error"); });
}

function watchTask() {
  const el = document.getElementById("task");
  if (!el) return;
  const bar = document.getElementById("task-progress");
  const state = document.getElementById("task-state");
  const error = document.getElementById("task-error");
  const poll = () => fetch("/tasks/" + el.dataset.id + ".json").then(r => r.json()).then(t => {
    if (t.fraction !== null) bar.value = t.fraction; else bar.removeAttribute("value");
    let text = t.state + (t.stage ? ": " + t.stage : "");
    if (t.total) text += " (" + t.n + " of " + t.total + " " + t.unit + ")";
    state.textContent = text;
    if (t.state === "done" && t.next) { window.location.replace(t.next); return; }
    if (t.state === "failed") { error.textContent = t.message; error.hidden = false; return; }
    setTimeout(poll, 250);
  }).catch(() => setTimeout(poll, 1000));
  poll();
}

function setupResults() {
  document.querySelectorAll("input.opacity").forEach(slider => {
    const top = slider.closest("figure").querySelector("img.top");
    slider.addEventListener("input", () => { top.style.opacity = slider.value; });
  });
  document.querySelectorAll(".panes[data-classes]").forEach(panes => {
    const section = panes.closest("section");
    const readout = section.querySelector(".readout");
    const names = JSON.parse(section.querySelector("script.class-names").textContent);
    const w = +panes.dataset.width, h = +panes.dataset.height, bytes = +panes.dataset.bytes;
    let classes = null;
    fetch(panes.dataset.classes).then(r => r.arrayBuffer()).then(buf => {
      classes = bytes === 2 ? new Uint16Array(buf) : new Uint8Array(buf);
    });
    panes.querySelectorAll(".hover").forEach(el => {
      el.addEventListener("mousemove", ev => {
        if (!classes) return;
        const rect = el.getBoundingClientRect();
        const x = Math.min(w - 1, Math.floor((ev.clientX - rect.left) * w / rect.width));
        const y = Math.min(h - 1, Math.floor((ev.clientY - rect.top) * h / rect.height));
        const c = classes[y * w + x];
        readout.textContent = "(" + x + ", " + y + "): " + c + " " + (names[c] || "class " + c);
      });
    });
  });
}

function watchJob() {
  // A training job's page: its status polled every 2 s (curves.csv is written at most that often; a
  // poll takes the server a few ms); the curves picture fetched again when the job's process drew it anew; the page reloaded when the job starts or ends (its buttons are the server's).
  const el = document.getElementById("job");
  if (!el) return;
  const $ = id => document.getElementById(id);
  const num = v => (typeof v === "number") ? Number(v.toPrecision(6)).toString() : "—";
  const img = $("job-curves");
  const active = state => state === "running" || state === "starting";
  const poll = () => fetch("/jobs/" + encodeURIComponent(el.dataset.name) + "/status.json", {cache: "no-store"})
    .then(r => r.json()).then(s => {
      if (s.error) { $("job-message").textContent = s.error; return; }
      if (active(s.state) !== active(el.dataset.state)) { window.location.reload(); return; }
      el.dataset.state = s.state;
      $("job-state").textContent = s.state + (s.stopping ? " (stopping)" : "");
      $("job-message").textContent = s.message || "";
      const bar = $("job-progress");
      if (s.fraction !== null) bar.value = s.fraction; else bar.removeAttribute("value");
      $("job-iteration").textContent = s.iteration === null ? 0 : s.iteration;
      $("job-max").textContent = s.max_iter;
      $("job-loss").textContent = num(s.loss);
      $("job-lr").textContent = num(s.lr);
      const tests = Object.entries(s.test).map(([k, v]) => k + " " + num(v));
      $("job-test").textContent = tests.length ? tests.join(" ") : "—";
      if (s.curves !== img.dataset.version) {
        img.dataset.version = s.curves;
        const next = new Image();  // swapped in when loaded: the picture never blinks
        next.onload = () => { img.src = next.src; img.dataset.points = s.points; };
        next.src = "/jobs/" + encodeURIComponent(el.dataset.name) + "/curves.png?v=" + encodeURIComponent(s.curves);
      }
      if (String(s.snapshots.length) !== el.dataset.snapshots) {
        el.dataset.snapshots = s.snapshots.length;
        const body = $("job-snapshots").querySelector("tbody");
        body.replaceChildren(...s.snapshots.map(snap => {
          const tr = document.createElement("tr");
          const cells = [String(snap.iteration), [snap.model, "caffemodel"], snap.state ? [snap.state, "solverstate"] : ""];
          for (const c of cells) {
            const td = document.createElement("td");
            if (Array.isArray(c)) { const a = document.createElement("a"); a.href = c[0]; a.textContent = c[1]; td.append(a); }
            else td.textContent = c;
            tr.append(td);
          }
          return tr;
        }));
        document.querySelectorAll("select.snapshot-choice").forEach(sel => {
          const chosen = sel.value;
          sel.replaceChildren(...s.snapshots.slice().reverse().map(snap => new Option(snap.iteration, snap.iteration)));
          if (chosen) sel.value = chosen;
        });
      }
      const log = $("job-log");
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      if (log.textContent !== s.log) { log.textContent = s.log; if (atEnd) log.scrollTop = log.scrollHeight; }
      if (active(s.state)) setTimeout(poll, 2000);
    }).catch(() => setTimeout(poll, 2000));
  const log = $("job-log");
  log.scrollTop = log.scrollHeight;
  if (active(el.dataset.state)) setTimeout(poll, 2000);
}

document.addEventListener("DOMContentLoaded", () => { loadNetPicture(); watchTask(); setupResults(); watchJob(); });
