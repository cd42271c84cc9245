// Room page client: one WebSocket per open room, resumed from the newest seq
// the page holds, with reconnects on exponential backoff and full jitter.
// Message elements are kept in seq order and never shown twice.
(function () {
  "use strict";

  const RECONNECT_BASE_MS = 500;
  const RECONNECT_CAP_MS = 15000;
  // Close codes after which a retry cannot succeed (see the README).
  const FINAL_CLOSE_CODES = { 4400: "bad resume position", 4401: "not logged in", 4404: "room not found" };
  const PIN_THRESHOLD_PX = 40;

  const messages = document.getElementById("messages");
  if (!messages) return;
  const log = document.getElementById("message-log");
  const pending = document.getElementById("pending");
  const errors = document.getElementById("chat-errors");
  const stateEl = document.getElementById("connection-state");
  const newMarker = document.getElementById("new-messages");
  const presence = document.getElementById("presence");
  const form = document.getElementById("composer");
  const textarea = form.querySelector("textarea[name=body]");

  let lastSeq = Number(messages.dataset.after || 0);
  let socket = null;
  let attempt = 0;
  let retryTimer = null;
  let countdownTimer = null;
  let stopped = false;
  const outbox = []; // frames written while disconnected, sent in order on open

  function setState(state, text) {
    stateEl.hidden = false; // hidden in the HTML, so that a page without JavaScript shows no state
    stateEl.dataset.state = state;
    stateEl.textContent = text;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + messages.dataset.wsPath + "?after=" + lastSeq;
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    if (stopped || (socket && socket.readyState <= WebSocket.OPEN)) return;
    setState("connecting", "Connecting…");
    socket = new WebSocket(socketUrl());
    socket.addEventListener("open", onOpen);
    socket.addEventListener("message", (event) => applyFrame(event.data));
    socket.addEventListener("close", onClose);
  }

  function onOpen() {
    attempt = 0;
    setState("connected", "Connected");
    while (outbox.length && socket.readyState === WebSocket.OPEN) {
      socket.send(outbox.shift());
    }
  }

  function onClose(event) {
    socket = null;
    if (FINAL_CLOSE_CODES[event.code]) {
      stopped = true;
      setState("offline", "Offline: " + FINAL_CLOSE_CODES[event.code]);
      return;
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (stopped) return;
    // Full jitter: a random delay up to the capped exponential bound, so
    // that clients dropped together do not come back together.
    const bound = Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** attempt);
    const delay = Math.random() * bound;
    attempt += 1;
    const due = Date.now() + delay;
    const showCountdown = () => {
      const seconds = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setState(navigator.onLine ? "reconnecting" : "offline",
        (navigator.onLine ? "Reconnecting in " : "Offline, retrying in ") + seconds + " s");
    };
    showCountdown();
    countdownTimer = setInterval(showCountdown, 1000);
    retryTimer = setTimeout(connect, delay);
  }

  function isPinned() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < PIN_THRESHOLD_PX;
  }

  function applyFrame(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    const pinned = isPinned();
    let added = 0;

    for (const element of template.content.querySelectorAll("[data-seq]")) {
      const seq = Number(element.dataset.seq);
      settlePending(element.dataset.clientId, "confirmed");
      if (seq <= lastSeq) continue;
      messages.appendChild(element);
      lastSeq = seq;
      added += 1;
    }
    for (const ack of template.content.querySelectorAll("[data-ack-seq]")) {
      const item = findPending(ack.dataset.clientId);
      if (item) item.dataset.state = "stored";
    }
    applyPresence(template.content);
    for (const error of template.content.querySelectorAll("[data-error]")) {
      const item = findPending(error.dataset.clientId);
      if (item) {
        markFailed(item, error.textContent);
      } else {
        errors.appendChild(error);
      }
    }

    if (added && pinned) {
      log.scrollTop = log.scrollHeight;
    } else if (added) {
      newMarker.hidden = false;
    }
  }

  // Keep one element per online user: a snapshot replaces the list, and a
  // change adds or removes one user.
  function applyPresence(fragment) {
    const list = fragment.querySelector("#presence");
    if (!list) return;
    if (list.getAttribute("hx-swap-oob") === "innerHTML") {
      presence.replaceChildren(...list.children);
      return;
    }
    for (const change of list.querySelectorAll("[data-presence-change]")) {
      const user = change.dataset.presenceUser;
      const present = Array.from(presence.children).find((item) => item.dataset.presenceUser === user);
      if (change.dataset.presenceChange === "leave") {
        if (present) present.remove();
      } else if (!present) {
        change.removeAttribute("data-presence-change");
        presence.appendChild(change);
      }
    }
  }

  function findPending(clientId) {
    if (!clientId) return null;
    return Array.from(pending.children).find((item) => item.dataset.clientId === clientId) || null;
  }

  function settlePending(clientId) {
    const item = findPending(clientId);
    if (item) item.remove();
  }

  function markFailed(item, reason) {
    item.dataset.state = "failed";
    const note = item.querySelector(".status");
    note.textContent = "Not sent: " + reason;
    const retry = document.createElement("button");
    retry.type = "button";
    retry.textContent = "Retry";
    retry.addEventListener("click", () => {
      retry.remove();
      item.dataset.state = "pending";
      note.textContent = "Sending…";
      transmit(item.dataset.body, item.dataset.clientId);
    });
    item.appendChild(retry);
  }

  function transmit(body, clientId) {
    const frame = JSON.stringify({ body: body, client_id: clientId });
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(frame);
    } else {
      outbox.push(frame);
      connect();
    }
  }

  function send(body) {
    const clientId = crypto.randomUUID();
    const item = document.createElement("article");
    item.className = "message pending";
    item.dataset.clientId = clientId;
    item.dataset.state = "pending";
    item.dataset.body = body;
    const text = document.createElement("p");
    text.className = "body";
    text.textContent = body;
    const note = document.createElement("span");
    note.className = "status";
    note.textContent = "Sending…";
    item.append(text, note);
    pending.appendChild(item);
    log.scrollTop = log.scrollHeight;
    transmit(body, clientId);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = textarea.value.trim();
    if (!body) return;
    textarea.value = "";
    send(body);
  });

  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  log.addEventListener("scroll", () => {
    if (isPinned()) newMarker.hidden = true;
  });
  newMarker.querySelector("button").addEventListener("click", () => {
    log.scrollTop = log.scrollHeight;
    newMarker.hidden = true;
  });

  // Keep the reader's place when "load earlier" prepends older messages.
  let heightBeforeSwap = 0;
  document.body.addEventListener("htmx:beforeSwap", () => { heightBeforeSwap = log.scrollHeight; });
  document.body.addEventListener("htmx:afterSwap", () => {
    log.scrollTop += log.scrollHeight - heightBeforeSwap;
  });

  window.addEventListener("online", () => { attempt = 0; connect(); });
  window.addEventListener("offline", () => {
    if (socket) socket.close(4000, "browser offline");
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") connect();
  });
  window.addEventListener("pagehide", () => {
    stopped = true;
    if (socket) socket.close(1000, "page closed");
  });

  log.scrollTop = log.scrollHeight;
  connect();
})();
