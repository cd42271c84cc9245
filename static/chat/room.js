// Room page client: one WebSocket per open room, resumed from the newest seq
// the page holds, with reconnects on exponential backoff and full jitter.
// Message elements are kept in seq order and never shown twice.
//
// Every message the user sends stays in an outbox in localStorage until the
// server acknowledges it, rejects it or sends it back. The page sends the
// outbox one frame at a time, in order, with each message's original
// client_id, and starts again from the oldest entry on every new socket. So a
// message written offline, or one whose ack a dropped connection lost, is
// stored once by the server's client_id check, also after a reload.
(function () {
  "use strict";

  const RECONNECT_BASE_MS = 500;
  const RECONNECT_CAP_MS = 15000;
  // A handshake that has not completed by then is abandoned and retried,
  // because a socket to an unreachable host can stay in CONNECTING for minutes.
  const CONNECT_TIMEOUT_MS = 10000;
  // A sent frame without an ack or error by then means a dead connection that
  // the browser has not noticed, such as a half-open TCP connection after a
  // network change. The page then drops the socket and sends again on a new one.
  const ACK_TIMEOUT_MS = 20000;
  // Wait after a rate_limited error whose text gives no wait time.
  const RATE_LIMIT_RETRY_MS = 1000;
  const RATE_LIMIT_MAX_WAIT_MS = 60000;
  // The largest frame the node accepts (chatapp/node.py sets daphne's
  // --websocket-max-message-size to 65536). A larger frame closes the socket
  // with 1009, and sending it again on every reconnect would never end.
  const MAX_FRAME_BYTES = 65536;
  // Close codes after which a retry cannot succeed (see the README).
  const FINAL_CLOSE_CODES = {
    4400: "bad resume position",
    4401: "not logged in",
    4403: "banned by a moderator",
    4404: "room not found",
  };
  // Application close codes for sockets that the page drops itself.
  const CLOSE_BROWSER_OFFLINE = 4000;
  const CLOSE_ACK_TIMEOUT = 4001;
  const PIN_THRESHOLD_PX = 40;
  const REMOVED_TEXT = "This message was removed by a moderator."; // as in templates/chat/_message.html

  const messages = document.getElementById("messages");
  if (!messages) return;
  const room = messages.closest("[data-room]");
  const log = document.getElementById("message-log");
  const pending = document.getElementById("pending");
  const errors = document.getElementById("chat-errors");
  const stateEl = document.getElementById("connection-state");
  const newMarker = document.getElementById("new-messages");
  const presence = document.getElementById("presence");
  const form = document.getElementById("composer");
  const textarea = form.querySelector("textarea[name=body]");

  const currentUser = room.dataset.user;
  // One outbox per room and user, so that a user who logs in later on this
  // browser never sends the previous user's messages.
  const outboxKey = "chat:outbox:" + room.dataset.room + ":" + currentUser;

  let lastSeq = Number(messages.dataset.after || 0);
  let socket = null; // the page's only socket, CONNECTING or OPEN; null between sockets
  let attempt = 0;
  let retryTimer = null;
  let countdownTimer = null;
  let connectTimer = null;
  let stopped = false;
  // client_ids of the pending messages that no ack, message or error has
  // settled yet, in send order. The first one is sent next.
  const unacknowledged = [];
  let inFlight = null; // the client_id sent on the current socket that has no ack or error yet
  let ackTimer = null;
  let rateLimitTimer = null; // set while the server's rate limit holds back the next send

  // --- Outbox in localStorage -------------------------------------------
  // The stored value is a JSON list of {client_id, body} in send order. Each
  // change reads the stored list again, so two tabs of the same room keep
  // each other's entries.

  function readOutbox() {
    let entries;
    try {
      entries = JSON.parse(localStorage.getItem(outboxKey) || "[]");
    } catch (error) {
      console.warn("chat: cannot read the outbox " + outboxKey + " from localStorage", error);
      return [];
    }
    if (!Array.isArray(entries)) return [];
    return entries.filter((entry) => entry && typeof entry.client_id === "string" && typeof entry.body === "string");
  }

  function writeOutbox(entries) {
    try {
      if (entries.length) {
        localStorage.setItem(outboxKey, JSON.stringify(entries));
      } else {
        localStorage.removeItem(outboxKey);
      }
    } catch (error) {
      // Storage is full or disabled: the messages still go out from memory,
      // but a reload before they are acknowledged loses them.
      console.warn("chat: cannot save the outbox " + outboxKey + " to localStorage", error);
    }
  }

  function saveToOutbox(clientId, body) {
    const entries = readOutbox().filter((entry) => entry.client_id !== clientId);
    entries.push({ client_id: clientId, body: body });
    writeOutbox(entries);
  }

  function removeFromOutbox(clientId) {
    const entries = readOutbox();
    const kept = entries.filter((entry) => entry.client_id !== clientId);
    if (kept.length !== entries.length) writeOutbox(kept);
  }

  // --- Connection ---------------------------------------------------------

  function setState(state, text) {
    stateEl.hidden = false; // hidden in the HTML, so that a page without JavaScript shows no state
    stateEl.dataset.state = state;
    stateEl.textContent = text;
    refreshPendingNotes();
  }

  function isOpen() {
    return socket !== null && socket.readyState === WebSocket.OPEN;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + messages.dataset.wsPath + "?after=" + lastSeq;
  }

  function clearTimers() {
    clearTimeout(retryTimer);
    clearInterval(countdownTimer);
    clearTimeout(connectTimer);
    retryTimer = null;
  }

  function connect() {
    if (stopped || socket) return;
    if (!navigator.onLine) {
      // The browser reports no network, so a handshake would fail. The online
      // event connects at once; until then the backoff only checks again.
      // NOTE: this also waits for a server on 127.0.0.1, which stays reachable offline.
      if (!retryTimer) scheduleReconnect();
      return;
    }
    clearTimers();
    setState("connecting", "Connecting…");
    const opened = new WebSocket(socketUrl());
    socket = opened;
    // A socket the page has dropped can still fire events; only the current one counts.
    opened.addEventListener("open", () => { if (opened === socket) onOpen(); });
    opened.addEventListener("message", (event) => {
      if (opened !== socket) return;
      // The backoff restarts only once the server sends a frame: a busy
      // server accepts and at once closes with 4503, and those clients must
      // keep backing off.
      attempt = 0;
      applyFrame(event.data);
    });
    opened.addEventListener("close", (event) => { if (opened === socket) onClose(event); });
    connectTimer = setTimeout(() => {
      if (opened !== socket || opened.readyState !== WebSocket.CONNECTING) return;
      dropSocket(1000, "handshake timed out");
      scheduleReconnect();
    }, CONNECT_TIMEOUT_MS);
  }

  // Forget the current socket before closing it, so that its late close
  // event cannot clear a newer socket or schedule a second reconnect.
  function dropSocket(code, reason) {
    const dropped = socket;
    socket = null;
    forgetInFlight();
    clearTimeout(connectTimer);
    if (dropped) dropped.close(code, reason);
  }

  function onOpen() {
    clearTimeout(connectTimer);
    setState("connected", "Connected");
    sendNext();
  }

  function onClose(event) {
    socket = null;
    forgetInFlight();
    clearTimeout(connectTimer);
    if (FINAL_CLOSE_CODES[event.code]) {
      stopped = true;
      setState("offline", "Offline: " + FINAL_CLOSE_CODES[event.code]);
      return;
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (stopped) return;
    clearTimers();
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
    retryTimer = setTimeout(() => {
      clearTimers();
      connect();
    }, delay);
  }

  // --- Incoming frames ----------------------------------------------------

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
      if (element.dataset.author === currentUser && element.dataset.clientId) {
        settle(element.dataset.clientId);
        removePending(element.dataset.clientId);
      }
      if (seq <= lastSeq) continue;
      messages.appendChild(element);
      lastSeq = seq;
      added += 1;
    }
    for (const ack of template.content.querySelectorAll("[data-ack-seq]")) {
      applyAck(ack.dataset.clientId, Number(ack.dataset.ackSeq));
    }
    for (const removal of template.content.querySelectorAll("[data-removed-seq]")) {
      applyRemoval(Number(removal.dataset.removedSeq));
    }
    applyPresence(template.content);
    for (const error of template.content.querySelectorAll("[data-error]")) {
      applyError(error);
    }

    if (added && pinned) {
      log.scrollTop = log.scrollHeight;
    } else if (added) {
      newMarker.hidden = false;
    } else if (pinned) {
      // A failed message grew by its Retry button; keep the newest line in view.
      log.scrollTop = log.scrollHeight;
    }
  }

  function applyAck(clientId, seq) {
    if (!clientId) return;
    settle(clientId);
    const item = findPending(clientId);
    if (!item) return;
    if (seq <= lastSeq) {
      // The page already shows this seq, or it is older than the page's first
      // message (an earlier socket stored it), so no message frame will follow.
      item.remove();
      return;
    }
    item.dataset.state = "stored";
    item.querySelector(".status").textContent = "Sent";
  }

  function applyError(error) {
    const clientId = error.dataset.clientId;
    const item = findPending(clientId);
    if (error.dataset.error === "rate_limited" && item && unacknowledged.includes(clientId)) {
      // The message is fine but early: keep it first in line and send it again.
      holdForRateLimit(clientId, error.textContent);
      return;
    }
    if (clientId) settle(clientId);
    if (!item) {
      errors.appendChild(error);
    } else if (item.dataset.state !== "failed") {
      markFailed(item, error.textContent);
    }
  }

  // Show a moderator's removal the way the server renders a hidden message.
  function applyRemoval(seq) {
    const element = messages.querySelector('article.message[data-seq="' + seq + '"]');
    if (!element) return;
    element.classList.add("removed");
    element.setAttribute("data-removed", "");
    const body = element.querySelector(".body");
    if (body) body.textContent = REMOVED_TEXT;
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

  // --- Pending messages ---------------------------------------------------

  function findPending(clientId) {
    if (!clientId) return null;
    return Array.from(pending.children).find((item) => item.dataset.clientId === clientId) || null;
  }

  function removePending(clientId) {
    const item = findPending(clientId);
    if (item) item.remove();
  }

  // Stop sending a message again because the server has stored or rejected
  // it, and send the next one.
  function settle(clientId) {
    const index = unacknowledged.indexOf(clientId);
    if (index !== -1) unacknowledged.splice(index, 1);
    removeFromOutbox(clientId);
    if (inFlight === clientId) {
      forgetInFlight();
      sendNext();
    }
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
      enqueue(item.dataset.clientId, item.dataset.body);
    });
    item.appendChild(retry);
  }

  function pendingNote() {
    if (!isOpen()) return "Waiting for the connection…";
    if (rateLimitTimer) return "Waiting: the server allows only a few messages a second…";
    return "Sending…";
  }

  function refreshPendingNotes() {
    const note = pendingNote();
    for (const status of pending.querySelectorAll('[data-state="pending"] .status')) {
      status.textContent = note;
    }
  }

  function showPending(body, clientId) {
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
    note.textContent = pendingNote();
    item.append(text, note);
    pending.appendChild(item);
  }

  // Send the oldest unsettled message, unless one is already waiting for its
  // ack or error. One frame at a time keeps the order even when the server
  // rejects a frame for its rate limit and accepts the next one.
  function sendNext() {
    if (inFlight || rateLimitTimer || !isOpen() || !unacknowledged.length) return;
    const clientId = unacknowledged[0];
    const item = findPending(clientId);
    if (!item) {
      settle(clientId);
      sendNext();
      return;
    }
    const frame = JSON.stringify({ body: item.dataset.body, client_id: clientId });
    const size = new TextEncoder().encode(frame).length;
    if (size > MAX_FRAME_BYTES) {
      settle(clientId);
      markFailed(item, "Message is too large to send (" + size + " bytes, at most " + MAX_FRAME_BYTES + ").");
      sendNext();
      return;
    }
    inFlight = clientId;
    const sentOn = socket;
    ackTimer = setTimeout(() => {
      if (socket !== sentOn || inFlight !== clientId) return;
      console.warn("chat: no ack or error for message " + clientId + " within " + ACK_TIMEOUT_MS + " ms; reconnecting");
      dropSocket(CLOSE_ACK_TIMEOUT, "no acknowledgement");
      scheduleReconnect();
    }, ACK_TIMEOUT_MS);
    socket.send(frame);
  }

  function forgetInFlight() {
    inFlight = null;
    clearTimeout(ackTimer);
  }

  // Pause sending for the wait that the error text gives ("wait 1.5 s"), or
  // for RATE_LIMIT_RETRY_MS when it gives none, then send the same message again.
  function holdForRateLimit(clientId, text) {
    const match = /wait ([0-9]+(?:\.[0-9]+)?) s/.exec(text);
    const waitMs = match ? Math.min(RATE_LIMIT_MAX_WAIT_MS, Number(match[1]) * 1000) : RATE_LIMIT_RETRY_MS;
    if (inFlight === clientId) forgetInFlight();
    clearTimeout(rateLimitTimer);
    rateLimitTimer = setTimeout(() => {
      rateLimitTimer = null;
      refreshPendingNotes();
      sendNext();
    }, waitMs);
    refreshPendingNotes();
  }

  // Store the message in the outbox first, then send it when the messages
  // before it are settled and a socket is open.
  function enqueue(clientId, body) {
    if (!unacknowledged.includes(clientId)) unacknowledged.push(clientId);
    saveToOutbox(clientId, body);
    refreshPendingNotes();
    if (isOpen()) {
      sendNext();
    } else {
      connect();
    }
  }

  function send(body) {
    const clientId = crypto.randomUUID();
    showPending(body, clientId);
    log.scrollTop = log.scrollHeight;
    enqueue(clientId, body);
  }

  // Show the outbox of an earlier page load as pending and queue it again. An
  // entry whose message the server already rendered into this page is done.
  function restoreOutbox() {
    const shown = new Set(
      Array.from(messages.querySelectorAll("[data-client-id]"))
        .filter((element) => element.dataset.author === currentUser)
        .map((element) => element.dataset.clientId)
    );
    for (const entry of readOutbox()) {
      if (shown.has(entry.client_id)) {
        removeFromOutbox(entry.client_id);
      } else if (!findPending(entry.client_id)) {
        showPending(entry.body, entry.client_id);
        unacknowledged.push(entry.client_id);
      }
    }
  }

  // --- Composer and reading -----------------------------------------------

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
  // htmx fires afterSwap once per inserted top-level element, so the offset
  // is computed from the values saved before the swap and not added up.
  let beforeSwap = null;
  document.body.addEventListener("htmx:beforeSwap", (event) => {
    if (log.contains(event.target)) beforeSwap = { height: log.scrollHeight, top: log.scrollTop };
  });
  document.body.addEventListener("htmx:afterSwap", () => {
    if (beforeSwap) log.scrollTop = beforeSwap.top + log.scrollHeight - beforeSwap.height;
  });
  document.body.addEventListener("htmx:afterSettle", () => { beforeSwap = null; });

  // --- Browser events -----------------------------------------------------

  window.addEventListener("online", () => {
    attempt = 0;
    connect();
  });
  // A socket can stay OPEN on a network that is gone, so drop it and let the
  // online event or the backoff open a new one.
  window.addEventListener("offline", () => {
    if (!socket) return;
    dropSocket(CLOSE_BROWSER_OFFLINE, "browser offline");
    scheduleReconnect();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") connect();
  });
  window.addEventListener("pagehide", () => {
    stopped = true;
    clearTimers();
    dropSocket(1000, "page closed");
  });
  // A page restored from the back-forward cache has no socket since its pagehide.
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return;
    stopped = false;
    attempt = 0;
    connect();
  });

  restoreOutbox();
  log.scrollTop = log.scrollHeight;
  connect();
})();
