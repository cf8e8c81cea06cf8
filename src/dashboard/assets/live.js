// Live numbers without a reload: every few seconds, while the tab is
// visible, fetch this same page and swap in its #live section. Forms live
// outside #live, so nothing a person is typing is replaced.
(function () {
  var every = parseInt(document.body.dataset.refresh || "2000", 10);
  var state = document.getElementById("live-state");
  var busy = false;
  window.syncqLoadedAt = Date.now();
  window.syncqRefreshes = 0;
  function refresh() {
    if (busy || document.hidden || !document.getElementById("live")) return;
    busy = true;
    fetch(location.href, { headers: { "X-Syncq-Live": "1" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (next && live) { live.innerHTML = next.innerHTML; }
        window.syncqRefreshes += 1;
        if (state) { state.textContent = "live"; state.className = ""; }
      })
      .catch(function () { if (state) { state.textContent = "offline"; state.className = "bad"; } })
      .then(function () { busy = false; });
  }
  setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
})();
