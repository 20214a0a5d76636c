"use strict";
// The runs under the served directory, each linking to its dashboard; refreshed every 2 s.
function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (text instanceof Node) td.appendChild(text); else td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}
async function load() {
  try {
    const rows = await (await fetch("api/runs")).json();
    const body = document.querySelector("#runs tbody");
    body.textContent = "";
    for (const r of rows) {
      const tr = document.createElement("tr");
      const a = document.createElement("a");
      a.href = r.url + location.search;
      a.textContent = r.name;
      a.className = "run-link";
      cell(tr, a);
      cell(tr, r.state, "state-" + r.state);
      const c = r.counts || {};
      const bad = (c.failed || 0) + (c.skipped || 0) + (c.cancelled || 0);
      const left = (r.total || 0) - (c.succeeded || 0) - bad;
      cell(tr, (r.total || 0).toLocaleString(), "num");
      cell(tr, (c.succeeded || 0).toLocaleString(), "num");
      cell(tr, bad.toLocaleString(), "num");
      cell(tr, left.toLocaleString(), "num");
      body.appendChild(tr);
    }
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the server";
  }
}
load();
setInterval(load, 2000);
