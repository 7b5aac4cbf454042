# -*- test-case-name: tests.test_live -*-
"""
The demo's live page (``GET /``): plain HTML and a little JavaScript, no
build step.  It lists the products with their stock from ``/events``
(Server-Sent Events: a snapshot, then each change as it is committed), shows
the latest orders, and the pool, fiber and listener figures from ``/stats``.
Data is put in the page with ``textContent`` only (never parsed as HTML).

Hooks for tests: ``body[data-state]`` is ``live`` once a snapshot arrived;
each product is ``tr#product-<id>`` with a ``td.stock``.
"""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>klein-demo shop: live</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  .state { display: inline-block; padding: 0 .5em; border-radius: .3em;
           background: #eee; font-size: .85rem; }
  body[data-state=live] .state { background: #cfc; }
  body[data-state=reconnecting] .state { background: #fdc; }
  main { display: flex; gap: 2rem; flex-wrap: wrap; align-items: flex-start; }
  table { border-collapse: collapse; }
  th, td { padding: .15rem .6rem; text-align: left; border-bottom: 1px solid #eee; }
  td.stock, td.price { text-align: right; font-variant-numeric: tabular-nums; }
  tr.changed td { background: #ffb; transition: background 1s; }
  tr.out td.stock { color: #b00; }
  ul { padding-left: 1.2rem; margin: 0; }
  dl { display: grid; grid-template-columns: auto auto; gap: 0 1rem; margin: 0; }
  dt { color: #666; } dd { margin: 0; font-variant-numeric: tabular-nums; }
  section { min-width: 14rem; }
  h2 { font-size: 1rem; }
  code { background: #f4f4f4; padding: 0 .2em; }
</style>
</head>
<body data-state="connecting">
<h1>klein-demo shop <span class="state" id="state">connecting</span></h1>
<p>Products and stock, live from PostgreSQL NOTIFY through <code>/events</code>
(Server-Sent Events). API clients: <code>GET /routes</code> lists the routes.</p>
<main>
<section>
<h2>Products</h2>
<table>
<thead><tr><th>id</th><th>sku</th><th>name</th><th>price</th><th>stock</th></tr></thead>
<tbody id="products"></tbody>
</table>
</section>
<section>
<h2>Latest orders</h2>
<ul id="orders"><li>none yet</li></ul>
<h2>Server</h2>
<dl id="stats"></dl>
</section>
</main>
<script>
"use strict";
const tbody = document.getElementById("products");
const stateEl = document.getElementById("state");
let source = null;

function setState(state) {
  document.body.dataset.state = state;
  stateEl.textContent = state;
}

function cell(tr, cls) {
  let td = tr.querySelector("td." + cls);
  if (!td) {
    td = document.createElement("td");
    td.className = cls;
    tr.appendChild(td);
  }
  return td;
}

function upsert(p, flash) {
  let tr = document.getElementById("product-" + p.id);
  if (!tr) {
    tr = document.createElement("tr");
    tr.id = "product-" + p.id;
    tr.dataset.id = p.id;
    for (const cls of ["id", "sku", "name", "price", "stock"]) cell(tr, cls);
    let next = null;
    for (const row of tbody.rows) {
      if (Number(row.dataset.id) > p.id) { next = row; break; }
    }
    tbody.insertBefore(tr, next);
  }
  cell(tr, "id").textContent = p.id;
  cell(tr, "sku").textContent = p.sku;
  cell(tr, "name").textContent = p.name;
  cell(tr, "price").textContent = (p.price_cents / 100).toFixed(2);
  cell(tr, "stock").textContent = p.stock;
  tr.classList.toggle("out", p.stock === 0);
  if (flash) {
    tr.classList.add("changed");
    setTimeout(() => tr.classList.remove("changed"), 1200);
  }
}

function connect() {
  source = new EventSource("/events");
  source.onopen = () => setState("connected");
  source.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    tbody.replaceChildren();
    for (const p of snap.products) upsert(p, false);
    setState("live");
  });
  source.addEventListener("stock", (e) => {
    const p = JSON.parse(e.data);
    if (p.deleted) {
      const tr = document.getElementById("product-" + p.id);
      if (tr) tr.remove();
    } else {
      upsert(p, true);
    }
  });
  source.addEventListener("orders", (e) => {
    const o = JSON.parse(e.data);
    const list = document.getElementById("orders");
    if (list.dataset.empty !== "no") {
      list.replaceChildren();
      list.dataset.empty = "no";
    }
    const li = document.createElement("li");
    const items = o.lines.reduce((n, l) => n + l.quantity, 0);
    li.textContent = "order " + o.id + ": " + items + " item(s), "
      + (o.total_cents / 100).toFixed(2);
    list.prepend(li);
    while (list.children.length > 10) list.lastChild.remove();
  });
  source.onerror = () => {
    setState("reconnecting");
    if (source.readyState === EventSource.CLOSED) {
      // The server answered with an error (e.g. 503): EventSource gives up
      // by itself in that case, so try again a little later.
      setTimeout(connect, 3000);
    }
  };
}

async function refreshStats() {
  try {
    const r = await fetch("/stats", {headers: {"accept": "application/json"}});
    const s = await r.json();
    const rows = [
      ["pool: open", s.pool.open], ["pool: in use", s.pool.checked_out],
      ["pool: idle", s.pool.idle], ["pool: waiting", s.pool.waiting],
      ["fibers: live", s.fibers.live], ["fibers: parked", s.fibers.parked],
      ["fibers: started", s.fibers.started],
      ["live streams", s.listener.subscribers],
      ["notifications", s.listener.received],
      ["listener", s.listener.connected ? "connected" : "down"],
    ];
    const dl = document.getElementById("stats");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
  } catch (e) { /* the next round will tell */ }
}

connect();
refreshStats();
setInterval(refreshStats, 2000);
</script>
</body>
</html>
"""
