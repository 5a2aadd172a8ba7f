// A Web Worker for pages opened from disk (file://), where browsers refuse to start workers: the worker's
// script runs in a hidden same-origin iframe and messages pass as events. Material's offline plugin names
// a shim of this kind from a CDN; this one ships with the site, so search works with no network at all.
(function () {
  if (location.protocol !== "file:" || typeof window.Worker === "undefined") return;
  class IframeWorker extends EventTarget {
    constructor(url) {
      super();
      this.onmessage = null;
      this.queue = [];
      this.frame = document.createElement("iframe");
      this.frame.style.display = "none";
      (document.body || document.documentElement).appendChild(this.frame);
      const w = this.frame.contentWindow;
      w.postMessage = (data) => setTimeout(() => {
        const ev = new MessageEvent("message", { data: data });
        this.dispatchEvent(ev);
        if (typeof this.onmessage === "function") this.onmessage(ev);
      });
      w.importScripts = function () { console.warn("importScripts is not available in the file:// worker shim"); };
      const script = w.document.createElement("script");
      script.onload = () => { this.ready = true; this.queue.splice(0).forEach((d) => this.postMessage(d)); };
      script.src = new URL(url, location.href).href;
      w.document.head.appendChild(script);
    }
    postMessage(data) {
      if (!this.ready) { this.queue.push(data); return; }
      const w = this.frame.contentWindow;
      setTimeout(() => w.dispatchEvent(new w.MessageEvent("message", { data: data })));
    }
    terminate() { this.frame.remove(); }
  }
  window.Worker = IframeWorker;
})();
