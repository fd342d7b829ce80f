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

document.addEventListener("DOMContentLoaded", () => { loadNetPicture(); watchTask(); setupResults(); });
