// The page of `inferix serve`: opens a session, plays it (MediaSource over the WebSocket, or WebRTC), sends
// keys and control messages, forks. Plain JS, no build step; talks only to the server that served it.
// A keyboard-and-mouse model (Matrix-Game) starts from an image picked here and is steered by the held keys and
// by camera deltas from the mouse (pointer lock on the video, or a drag on it).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const KEY_STORE = "inferix.key";
  // keys -> action names (used only for the actions the model has)
  const KEYS = {arrowleft: "left", a: "left", arrowright: "right", d: "right", arrowup: "up", w: "up",
                arrowdown: "down", s: "down", x: "none", " ": "none"};
  const MAX_LAG_S = 1.0; // MediaSource: further behind the newest frame than this, jump to the live edge
  const CATCH_UP_S = 0.35; // between this and MAX_LAG_S, play a little faster to catch up
  const KEEP_S = 6; // MediaSource: keep this much played video in the buffer
  const ICE_GATHER_MS = 3000;
  // keyboard-and-mouse models: pointer movement (px) -> camera delta per frame, sent at most every MOUSE_MS
  const MOUSE_SCALE = 0.004;
  const MOUSE_MAX = 0.5;
  const MOUSE_MS = 100;

  let model = null;
  const sessions = new Map(); // id -> {id, token}
  let current = null; // the session this page plays: {id, token}
  let conn = null; // its connection (MseConn or RtcConn)
  let lastFork = null;
  let seq = 0;
  const sentAt = new Map(); // seq -> [performance.now() when sent, message type]
  const applied = []; // the last control messages applied: {seq, control, block, ms}
  const known = []; // every session this page opened or forked: {id, token}
  let paused = false;
  let km = null; // the model's keyboard-and-mouse controls ({keys: [{name, letter}], mouse}) or null
  const held = new Set(); // key letters held down (keyboard-and-mouse models)
  let mouseAcc = [0, 0]; // pointer movement since the last camera update, px [dx, dy]
  let mouseSent = [0, 0]; // the camera delta [pitch, yaw] last sent
  let drag = null; // a pointer drag on the video: {x, y, moved}
  let startImage = null; // the start image as a PNG data URL at the model's size

  // ---- helpers ----------------------------------------------------------------------------------------------
  function apiKey() { return $("key").value.trim(); }

  function url(path) { return new URL(path, location.href); }

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  }

  async function api(method, path, body, token) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
    if (token) headers["X-Session-Token"] = token;
    const r = await fetch(url(path), {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const err = data && data.error;
      const e = new Error(err ? `${err.code}: ${err.message}` : `HTTP ${r.status}`);
      e.status = r.status;
      throw e;
    }
    return data;
  }

  function setText(id, text) { $(id).textContent = text; }

  function setRunning(on) {
    for (const id of ["set-prompt", "pause", "fork", "close"]) $(id).disabled = !on || (id === "set-prompt" &&
      !!(model && model.takes_image));
    for (const b of document.querySelectorAll("#actions button")) b.disabled = !on;
  }

  function transport() {
    return document.querySelector('input[name="transport"]:checked').value;
  }

  // ---- the model --------------------------------------------------------------------------------------------
  async function loadModel() {
    try {
      model = await api("GET", "v1/model");
    } catch (e) {
      model = null;
      setText("model", "model unavailable");
      showError(e.status === 401 ? "this server needs an API key: enter it above" : `model: ${e.message}`);
      return;
    }
    showError("");
    const bits = [model.name, `${model.width}x${model.height}`, `${model.fps} fps`];
    if (model.block_pixel_frames) bits.push(`${model.block_pixel_frames} frames per block`);
    setText("model", bits.join(" · "));
    if (!$("prompt").value && model.default_prompt) $("prompt").value = model.default_prompt;
    const rtc = $("transport-webrtc");
    rtc.disabled = !model.webrtc || typeof RTCPeerConnection === "undefined";
    if (rtc.disabled && rtc.checked) $("transport-mse").checked = true;
    const box = $("actions");
    box.replaceChildren();
    km = model.actions && model.actions.type === "keyboard_mouse" ? model.actions : null;
    // an image-conditioned model takes no prompt: its start image takes the prompt's place
    $("prompt-box").hidden = !!model.takes_image;
    $("set-prompt").hidden = !!model.takes_image;
    $("image-box").hidden = !model.takes_image;
    $("input-box").hidden = !km;
    video.classList.toggle("steer", !!(km && km.mouse));
    if (km) {
      const keys = km.keys.filter((k) => k.letter).map((k) => k.letter.toUpperCase()).join("/");
      setText("hint", `Keys: hold ${keys || "the buttons"} to move` + (km.mouse ? "; click the video to steer the " +
        "camera with the mouse (Esc releases it), or drag on it." : "."));
      for (const k of km.keys) {
        const b = document.createElement("button");
        b.id = "key-" + k.name;
        b.dataset.key = k.letter || k.name;
        b.textContent = k.letter ? `${k.letter.toUpperCase()} ${k.name}` : k.name;
        b.disabled = !conn;
        // held while the pointer is down on it, like a key
        b.addEventListener("pointerdown", () => setHeld(b.dataset.key, true));
        for (const ev of ["pointerup", "pointerleave", "pointercancel"]) {
          b.addEventListener(ev, () => setHeld(b.dataset.key, false));
        }
        box.appendChild(b);
      }
      renderInput();
      return;
    }
    const values = (model.actions && model.actions.values) || [];
    for (const a of values) {
      const b = document.createElement("button");
      b.id = "act-" + a;
      b.dataset.action = a;
      b.textContent = a;
      b.disabled = !conn;
      b.addEventListener("click", () => act(a));
      box.appendChild(b);
    }
  }

  function hasAction(a) {
    return !!(model && model.actions && model.actions.values && model.actions.values.includes(a));
  }

  // ---- control messages -------------------------------------------------------------------------------------
  function send(msg) {
    if (!conn) return false;
    seq += 1;
    msg.seq = seq;
    sentAt.set(seq, [performance.now(), msg.type]);
    if (sentAt.size > 256) sentAt.delete(sentAt.keys().next().value);
    conn.send(msg);
    return true;
  }

  function act(action) {
    if (!send({type: "act", action})) return;
    for (const b of document.querySelectorAll("#actions button")) {
      b.classList.toggle("current", b.dataset.action === action);
    }
  }

  // ---- keyboard and mouse (Matrix-Game) ----------------------------------------------------------------------
  function kmAction() {
    // the held keys by letter (by name for a key without one) and the current camera delta
    const letters = [], names = [];
    for (const k of km.keys) {
      if (!held.has(k.letter || k.name)) continue;
      if (k.letter) letters.push(k.letter); else names.push(k.name);
    }
    const action = {keys: names.length ? km.keys.filter((k) => held.has(k.letter || k.name)).map((k) => k.name) :
      letters.join("")};
    if (km.mouse) action.mouse = mouseSent.slice();
    return action;
  }

  function sendInput() {
    renderInput();
    send({type: "act", action: kmAction()});
  }

  function renderInput() {
    if (!km) return;
    const keys = km.keys.filter((k) => held.has(k.letter || k.name)).map((k) => k.name);
    let text = keys.length ? keys.join("+") : "no keys";
    if (km.mouse) text += ` · camera ${mouseSent[0].toFixed(3)}, ${mouseSent[1].toFixed(3)}`;
    setText("input", text);
    for (const b of document.querySelectorAll("#actions button")) {
      b.classList.toggle("held", held.has(b.dataset.key));
    }
  }

  function setHeld(key, down) {
    if (!km || held.has(key) === down) return;
    if (down) held.add(key); else held.delete(key);
    sendInput();
  }

  function releaseAll() {
    const moving = mouseSent[0] !== 0 || mouseSent[1] !== 0;
    if (!km || (!held.size && !moving)) return;
    held.clear();
    mouseAcc = [0, 0];
    mouseSent = [0, 0];
    sendInput();
  }

  function clampDelta(v) {
    return Math.round(Math.max(-MOUSE_MAX, Math.min(MOUSE_MAX, v)) * 1e4) / 1e4;
  }

  // the camera: the pointer movement of the last MOUSE_MS as a delta (mouse up looks up: +pitch; right: +yaw);
  // sent only when it changes, so a resting mouse sends one zero
  function mouseTick() {
    if (!km || !km.mouse) return;
    const [dx, dy] = mouseAcc;
    mouseAcc = [0, 0];
    const m = [clampDelta(-dy * MOUSE_SCALE) || 0, clampDelta(dx * MOUSE_SCALE) || 0];
    if (m[0] === mouseSent[0] && m[1] === mouseSent[1]) return;
    mouseSent = m;
    sendInput();
  }

  function locked() { return document.pointerLockElement === video; }

  function onEvent(ev) {
    switch (ev.type) {
      case "media":
        break;
      case "state":
        paused = !!ev.paused;
        setText("state", ev.state === "waiting" && ev.position != null ? `waiting (${ev.position})` :
          (paused && ev.state === "running" ? "paused" : ev.state) + (ev.throttled ? " (held)" : ""));
        $("pause").textContent = paused || ev.state === "paused" ? "Resume" : "Pause";
        break;
      case "block":
        setText("block", String(ev.block));
        if (Array.isArray(ev.frames)) setText("frames", String(ev.frames[1]));
        break;
      case "applied": {
        const sent = sentAt.get(ev.seq);
        if (sent !== undefined) {
          const ms = Math.round(performance.now() - sent[0]);
          setText("latency", `${ms} ms (block ${ev.block})`);
          sentAt.delete(ev.seq);
          applied.push({seq: ev.seq, control: sent[1], block: ev.block, ms});
          if (applied.length > 32) applied.shift();
        }
        break;
      }
      case "forked":
        lastFork = {id: ev.id, token: ev.token};
        sessions.set(ev.id, lastFork);
        known.push(lastFork);
        setText("fork-id", ev.id);
        $("switch-fork").disabled = false;
        renderSessions();
        break;
      case "error":
        if (ev.seq !== undefined) sentAt.delete(ev.seq);
        showError(`${ev.code}: ${ev.message}`);
        break;
      case "end":
        setText("state", `${ev.reason}`);
        if (ev.reason !== "replaced" && current) {
          sessions.delete(current.id);
          renderSessions();
        }
        stopConn();
        break;
      default:
        break;
    }
  }

  // ---- MediaSource over the WebSocket -----------------------------------------------------------------------
  class MseConn {
    constructor(sess, onEvent, onGone) {
      this.sess = sess;
      this.onEvent = onEvent;
      this.onGone = onGone;
      this.outbox = [];
      this.chunks = [];
      this.sb = null;
      this.closed = false;
      this.ms = new MediaSource();
      video.srcObject = null;
      this.objectUrl = URL.createObjectURL(this.ms);
      video.src = this.objectUrl;
      this.ms.addEventListener("sourceopen", () => this.open(), {once: true});
    }

    open() {
      if (this.closed) return;
      const u = url(`v1/sessions/${encodeURIComponent(this.sess.id)}/ws`);
      u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      u.searchParams.set("token", this.sess.token);
      if (apiKey()) u.searchParams.set("key", apiKey());
      const ws = this.ws = new WebSocket(u);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => { for (const m of this.outbox.splice(0)) ws.send(m); };
      ws.onmessage = (m) => {
        if (this.closed) return;
        if (typeof m.data === "string") {
          let ev;
          try { ev = JSON.parse(m.data); } catch (e) { return; }
          if (ev.type === "media") this.setup(ev);
          this.onEvent(ev);
        } else {
          this.chunks.push(new Uint8Array(m.data));
          this.pump();
        }
      };
      ws.onclose = (e) => {
        if (!this.closed) this.onGone(e.code === 1000 || e.code === 1005 ? "" : `connection closed (${e.code})`);
      };
    }

    setup(ev) {
      if (this.sb || !(ev.mime || ev.codec)) return; // no codec yet: a later media event has it
      const mime = ev.mime || `video/mp4; codecs="${ev.codec}"`;
      if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
        showError(`this browser cannot play ${mime} with MediaSource: choose WebRTC`);
        return;
      }
      this.sb = this.ms.addSourceBuffer(mime);
      this.sb.addEventListener("updateend", () => { this.tend(); this.pump(); });
      this.sb.addEventListener("error", () => showError("the video could not be decoded"));
    }

    pump() {
      const sb = this.sb;
      if (!sb || sb.updating || !this.chunks.length || this.ms.readyState !== "open") return;
      let n = 0;
      for (const c of this.chunks) n += c.length;
      const all = new Uint8Array(n);
      let o = 0;
      for (const c of this.chunks.splice(0)) { all.set(c, o); o += c.length; }
      try {
        sb.appendBuffer(all);
      } catch (e) {
        if (e.name === "QuotaExceededError" && video.buffered.length) {
          this.chunks.unshift(all);
          sb.remove(0, Math.max(0, video.currentTime - 1));
        } else {
          showError(`video: ${e.message}`);
        }
      }
    }

    // keep playback at the live edge and the buffer short
    tend() {
      const b = video.buffered;
      if (!b.length || this.closed) return;
      const end = b.end(b.length - 1);
      const start = b.start(b.length - 1);
      if (video.currentTime < start || end - video.currentTime > MAX_LAG_S) {
        video.currentTime = Math.max(start, end - 0.1);
      }
      video.playbackRate = end - video.currentTime > CATCH_UP_S ? 1.25 : 1.0;
      if (video.paused) video.play().catch(() => {});
      const sb = this.sb;
      if (sb && !sb.updating && video.currentTime - b.start(0) > 2 * KEEP_S) {
        sb.remove(0, video.currentTime - KEEP_S);
      }
    }

    send(msg) {
      const text = JSON.stringify(msg);
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(text);
      else this.outbox.push(text);
    }

    close() {
      this.closed = true;
      if (this.ws) this.ws.close(1000);
      try { if (this.ms.readyState === "open") this.ms.endOfStream(); } catch (e) { /* already ended */ }
      URL.revokeObjectURL(this.objectUrl);
    }
  }

  // ---- WebRTC -----------------------------------------------------------------------------------------------
  function gathered(pc, ms) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { clearTimeout(t); pc.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const t = setTimeout(done, ms);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  class RtcConn {
    constructor(sess, onEvent, onGone) {
      this.sess = sess;
      this.onEvent = onEvent;
      this.onGone = onGone;
      this.outbox = [];
      this.closed = false;
      video.removeAttribute("src");
      video.srcObject = null;
      this.start().catch((e) => { if (!this.closed) this.onGone(`WebRTC: ${e.message}`); });
    }

    async start() {
      const pc = this.pc = new RTCPeerConnection({iceServers: []});
      pc.addTransceiver("video", {direction: "recvonly"});
      const dc = this.dc = pc.createDataChannel("control");
      dc.onopen = () => { for (const m of this.outbox.splice(0)) dc.send(m); };
      dc.onmessage = (m) => {
        if (this.closed || typeof m.data !== "string") return;
        let ev;
        try { ev = JSON.parse(m.data); } catch (e) { return; }
        this.onEvent(ev);
      };
      dc.onclose = () => { if (!this.closed) this.onGone(""); };
      pc.ontrack = (e) => {
        if ("playoutDelayHint" in e.receiver) e.receiver.playoutDelayHint = 0;
        if ("jitterBufferTarget" in e.receiver) e.receiver.jitterBufferTarget = 0;
        video.srcObject = e.streams && e.streams[0] ? e.streams[0] : new MediaStream([e.track]);
        video.play().catch(() => {});
      };
      pc.onconnectionstatechange = () => {
        if (!this.closed && pc.connectionState === "failed") this.onGone("WebRTC connection failed");
      };
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc, ICE_GATHER_MS); // no trickle ICE: the offer carries the candidates
      if (this.closed) return;
      const answer = await api("POST", `v1/sessions/${encodeURIComponent(this.sess.id)}/webrtc`,
        {sdp: pc.localDescription.sdp, type: "offer"}, this.sess.token);
      if (this.closed) return;
      await pc.setRemoteDescription(answer);
    }

    send(msg) {
      const text = JSON.stringify(msg);
      if (this.dc && this.dc.readyState === "open") this.dc.send(text);
      else this.outbox.push(text);
    }

    close() {
      this.closed = true;
      try { if (this.dc) this.dc.close(); } catch (e) { /* closed */ }
      try { if (this.pc) this.pc.close(); } catch (e) { /* closed */ }
      video.srcObject = null;
    }
  }

  // ---- sessions ---------------------------------------------------------------------------------------------
  function stopConn() {
    if (conn) conn.close();
    conn = null;
    setRunning(false);
  }

  function connect(sess) {
    stopConn();
    current = sess;
    setText("session-id", sess.id);
    setText("latency", "-");
    setText("block", "-");
    setText("frames", "0");
    const Conn = transport() === "webrtc" ? RtcConn : MseConn;
    const c = new Conn(sess, (ev) => { if (conn === c) onEvent(ev); }, (why) => {
      if (conn !== c) return;
      if (why) showError(why);
      stopConn();
    });
    conn = c;
    setRunning(true);
    renderSessions();
  }

  function renderSessions() {
    const list = $("sessions");
    list.replaceChildren();
    for (const s of sessions.values()) {
      const li = document.createElement("li");
      li.dataset.id = s.id;
      li.className = current && current.id === s.id ? "current" : "";
      li.append(`${s.id} `);
      if (!(current && current.id === s.id && conn)) {
        const b = document.createElement("button");
        b.textContent = "play";
        b.className = "play-session";
        b.addEventListener("click", () => { connect(s); send({type: "resume"}); });
        li.append(b);
      }
      list.append(li);
    }
  }

  async function start() {
    showError("");
    if (!model) await loadModel();
    if (model && model.takes_image && !startImage) {
      showError("choose a start image first: this model starts from an image");
      return;
    }
    const old = current;
    stopConn();
    if (old && sessions.has(old.id) && old !== lastFork) {
      sessions.delete(old.id);
      api("DELETE", `v1/sessions/${encodeURIComponent(old.id)}`, undefined, old.token).catch(() => {});
    }
    const seedText = $("seed").value.trim();
    const seed = seedText === "" ? 0 : Number(seedText);
    if (!Number.isInteger(seed) || seed < 0) { showError("the seed must be a whole number >= 0"); return; }
    $("start").disabled = true;
    try {
      const body = {prompt: $("prompt").value, seed, video: "fmp4", num_frames: null};
      if (model && model.takes_image) {
        body.image = startImage;
        delete body.prompt;
      }
      if (km) body.action = kmAction();
      const s = await api("POST", "v1/sessions", body);
      const sess = {id: s.id, token: s.token};
      sessions.set(sess.id, sess);
      known.push(sess);
      setText("state", s.state === "waiting" ? `waiting (${s.position})` : s.state);
      lastFork = null;
      setText("fork-id", "-");
      $("switch-fork").disabled = true;
      connect(sess);
    } catch (e) {
      showError(`start: ${e.message}`);
    } finally {
      $("start").disabled = false;
    }
  }

  async function closeSession() {
    if (!current) return;
    const s = current;
    if (conn) {
      send({type: "close"});
    } else {
      try { await api("DELETE", `v1/sessions/${encodeURIComponent(s.id)}`, undefined, s.token); }
      catch (e) { showError(`close: ${e.message}`); }
    }
    sessions.delete(s.id);
    renderSessions();
  }

  // ---- wiring -----------------------------------------------------------------------------------------------
  $("key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("key").addEventListener("change", () => {
    const k = apiKey();
    if (k) sessionStorage.setItem(KEY_STORE, k); else sessionStorage.removeItem(KEY_STORE);
    loadModel();
  });
  $("start").addEventListener("click", start);
  $("set-prompt").addEventListener("click", () => send({type: "prompt", prompt: $("prompt").value}));
  $("pause").addEventListener("click", () => send({type: paused || $("pause").textContent === "Resume" ?
    "resume" : "pause"}));
  $("fork").addEventListener("click", () => send({type: "fork"}));
  $("close").addEventListener("click", closeSession);
  $("switch-fork").addEventListener("click", () => {
    if (!lastFork) return;
    const f = lastFork;
    $("switch-fork").disabled = true;
    connect(f);
    send({type: "resume"});
  });
  for (const r of document.querySelectorAll('input[name="transport"]')) {
    r.addEventListener("change", () => { if (current && conn) connect(current); });
  }
  $("image").addEventListener("change", async () => {
    const file = $("image").files[0];
    startImage = null;
    $("image-preview").hidden = true;
    if (!file || !model) return;
    try {
      // cropped to the model's aspect ratio (centred) and scaled to its size: the server takes exactly that
      const bmp = await createImageBitmap(file);
      const c = document.createElement("canvas");
      c.width = model.width;
      c.height = model.height;
      const scale = Math.max(c.width / bmp.width, c.height / bmp.height);
      const w = c.width / scale, h = c.height / scale;
      c.getContext("2d").drawImage(bmp, (bmp.width - w) / 2, (bmp.height - h) / 2, w, h, 0, 0, c.width, c.height);
      startImage = c.toDataURL("image/png");
      $("image-preview").src = startImage;
      $("image-preview").hidden = false;
      showError("");
    } catch (e) {
      showError(`the start image could not be read: ${e.message}`);
    }
  });
  // the mouse steers the camera: pointer lock on a click on the video, else a drag on it
  video.addEventListener("pointerdown", (e) => {
    if (!km || !km.mouse || locked() || e.button !== 0) return;
    drag = {x: e.clientX, y: e.clientY, moved: 0};
    e.preventDefault();
  });
  document.addEventListener("pointermove", (e) => {
    if (!km || !km.mouse) return;
    if (locked()) {
      mouseAcc[0] += e.movementX;
      mouseAcc[1] += e.movementY;
    } else if (drag) {
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.x = e.clientX;
      drag.y = e.clientY;
      drag.moved += Math.abs(dx) + Math.abs(dy);
      mouseAcc[0] += dx;
      mouseAcc[1] += dy;
    }
  });
  document.addEventListener("pointerup", () => {
    const d = drag;
    drag = null;
    if (!d || d.moved > 3 || !conn || locked() || !video.requestPointerLock) return;
    // a click (no drag) takes the pointer; a browser that refuses leaves the drag to steer
    try {
      const p = video.requestPointerLock();
      if (p && p.catch) p.catch(() => {});
    } catch (e) { /* no pointer lock here */ }
  });
  setInterval(mouseTick, MOUSE_MS);
  window.addEventListener("blur", releaseAll);
  document.addEventListener("keyup", (e) => {
    if (!km) return;
    const k = e.key.toLowerCase();
    if (km.keys.some((x) => x.letter === k)) setHeld(k, false);
  });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable)) return;
    if (km) {
      const k = e.key.toLowerCase();
      if (!km.keys.some((x) => x.letter === k)) return;
      e.preventDefault();
      setHeld(k, true);
      return;
    }
    const a = KEYS[e.key.toLowerCase()];
    if (!a || !hasAction(a) || !conn) return;
    e.preventDefault();
    act(a);
  });
  window.addEventListener("pagehide", () => {
    // the page's sessions end with it (a fork included); keepalive lets the requests outlive the page
    const headers = {};
    if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
    for (const s of sessions.values()) {
      fetch(url(`v1/sessions/${encodeURIComponent(s.id)}`),
        {method: "DELETE", keepalive: true, headers: {...headers, "X-Session-Token": s.token}}).catch(() => {});
    }
  });

  // for tests and the curious: the page's state
  window.inferix = {
    get session() { return current && current.id; },
    get fork() { return lastFork && lastFork.id; },
    get transport() { return conn ? (conn instanceof RtcConn ? "webrtc" : "mse") : null; },
    get applied() { return applied.slice(); },
    get known() { return known.map((s) => ({id: s.id, token: s.token})); },
    get input() { return km ? kmAction() : null; },
    get pointerLocked() { return locked(); },
  };

  setRunning(false);
  loadModel();
})();
