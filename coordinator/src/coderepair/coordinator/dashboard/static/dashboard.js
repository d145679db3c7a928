// Refreshes the dashboard in place: fetches the server-rendered panels (the same
// renderer as the first page load) every data-refresh-ms and swaps them in. The
// markup comes from our own server, which escapes every database string; the page's
// Content-Security-Policy allows no inline script, so injected markup could not run.
"use strict";
(function () {
  const main = document.getElementById("panels");
  const status = document.getElementById("status");
  if (!main || !status) {
    return;
  }
  const every = Number(main.dataset.refreshMs) || 3000;
  let busy = false;
  async function refresh() {
    if (busy) {
      return; // a slow answer must not pile up requests
    }
    busy = true;
    try {
      const response = await fetch(main.dataset.src, { cache: "no-store" });
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      main.innerHTML = await response.text();
      status.textContent = "live";
      status.className = "status";
      const done = Number(document.body.dataset.refreshes || "0") + 1;
      document.body.dataset.refreshes = String(done);
    } catch (error) {
      status.textContent = "disconnected (" + error.message + "), retrying";
      status.className = "status offline";
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, every);
})();
