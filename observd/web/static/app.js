/* observd dome page: live updates (server-sent events), night mode, the stack viewer.
   No library: the dome has no internet and the page must stay light. */
(function () {
  "use strict";
  var night = document.body.dataset.night;           /* "" = follow the latest night */
  var query = night ? "?night=" + encodeURIComponent(night) : "";
  var live = document.getElementById("live");
  var busy = false, again = false, seen = {}, shown = null;

  /* ---- live updates: on every event, fetch the sections and swap those that changed */
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch("/parts" + query, { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (data) {
        Object.keys(data.parts).forEach(function (name) {
          var el = document.querySelector('[data-part="' + name + '"]');
          if (el && seen[name] !== data.parts[name]) {
            if (seen[name] !== undefined || el.innerHTML.trim() !== data.parts[name].trim()) {
              el.innerHTML = data.parts[name];
            }
            seen[name] = data.parts[name];
          }
        });
        shown = data.sig;
        document.title = "observd · " + (data.night || "no night yet");
        document.body.dataset.updated = String(Date.now());
      })
      .catch(function () { /* the next event retries */ })
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }

  function connect() {
    var source = new EventSource("/events" + query);
    /* every event carries the server's signature; fetch when the page shows another */
    function check(e) {
      live.className = "live on";
      var sig = null;
      try { sig = JSON.parse(e.data).sig; } catch (err) { /* refresh anyway */ }
      if (e.type === "hello" || sig !== shown) refresh();
    }
    ["hello", "change", "state"].forEach(function (kind) { source.addEventListener(kind, check); });
    source.onerror = function () {
      live.className = "live off";
      /* EventSource retries by itself; if the browser gave up (CLOSED), start again */
      if (source.readyState === EventSource.CLOSED) { setTimeout(connect, 2000); }
    };
  }
  if (window.EventSource) connect();

  /* ---- red night mode, remembered */
  document.getElementById("mode").addEventListener("click", function () {
    var on = !document.documentElement.classList.contains("night");
    document.documentElement.classList.toggle("night", on);
    localStorage.setItem("observd-mode", on ? "night" : "day");
  });

  /* ---- the stack viewer: large, re-stretched on the server */
  var viewer = document.getElementById("viewer");
  var img = document.getElementById("viewer-img");
  var stretch = document.getElementById("viewer-stretch");
  var q = document.getElementById("viewer-q");
  var current = null, timer = null;
  function show() {
    if (current === null) return;
    img.src = "/stack/" + current + ".png?stretch=" + stretch.value + "&q=" + q.value +
      "&t=" + Date.now();
  }
  function open(fig) {
    current = fig.dataset.stack;
    document.getElementById("viewer-title").textContent = fig.dataset.title;
    viewer.hidden = false;
    show();
  }
  function close() { viewer.hidden = true; current = null; img.removeAttribute("src"); }
  document.addEventListener("click", function (e) {
    var fig = e.target.closest && e.target.closest("[data-stack]");
    if (fig) open(fig);
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") close();
    if (e.key === "Enter" && e.target.dataset && e.target.dataset.stack) open(e.target);
  });
  document.getElementById("viewer-close").addEventListener("click", close);
  stretch.addEventListener("change", show);
  q.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(show, 200); });
})();
