// rlhf-ext label: the labelling page. Every piece of item text is put in the page with textContent,
// never parsed as markup, so completions containing HTML or script stay plain text.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const NAME_KEY = "rlhf-ext-label-name";
  const TOKEN_KEY = "rlhf-ext-label-token";
  const KEYS = { "1": "A", "a": "A", "2": "B", "b": "B", "3": "tie", "t": "tie", "s": "skip" };
  let token = null;
  let labeller = null;
  let current = null;  // the item on screen: {id, prompt, a, b}
  let voteId = null;   // idempotency key of the vote for the item on screen: retries reuse it
  let busy = false;
  let rating = null;

  function newVoteId() {
    // crypto.getRandomValues works on plain http too (randomUUID needs a secure context)
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function readToken() {
    const params = new URLSearchParams(location.search || location.hash.replace(/^#/, "?"));
    const fromUrl = params.get("token");
    if (fromUrl) sessionStorage.setItem(TOKEN_KEY, fromUrl);
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers["X-Label-Token"] = token;
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const err = new Error((data && data.error) || `HTTP ${response.status}`);
      err.status = response.status;
      throw err;
    }
    return data;
  }

  function showProgress(p) {
    $("progress").textContent = `${p.done} labelled by you · ${p.remaining} left for you · ` +
      `${p.items_complete}/${p.items} items have ${p.k} label${p.k === 1 ? "" : "s"}`;
  }

  function setRating(value) {
    rating = value;
    for (const input of document.querySelectorAll("#rating-options input")) {
      input.checked = Number(input.value) === value;
    }
  }

  function showItem(item) {
    current = item;
    voteId = newVoteId();
    $("prompt").textContent = item.prompt;
    $("completion-a").textContent = item.a;
    $("completion-b").textContent = item.b;
    $("note").value = "";
    setRating(null);
    $("task").hidden = false;
    $("done").hidden = true;
  }

  async function loadNext() {
    busy = true;
    try {
      const data = await api("POST", "/api/next", { labeller });
      showProgress(data.progress);
      if (data.item) {
        showItem(data.item);
      } else {
        current = null;
        $("task").hidden = true;
        $("done").hidden = false;
      }
      showError(null);
    } catch (err) {
      showError(`Could not load the next item: ${err.message}`);
    } finally {
      busy = false;
      setButtons();
    }
  }

  function setButtons() {
    for (const button of document.querySelectorAll(".choices button")) button.disabled = busy || !current;
  }

  async function vote(choice) {
    if (busy || !current) return;
    busy = true;
    setButtons();
    const body = { vote_id: voteId, item_id: current.id, labeller, choice, note: $("note").value };
    if (rating !== null) body.rating = rating;
    // the same vote_id makes a retry after a lost answer harmless: the server stores the vote once
    for (let attempt = 1; ; attempt++) {
      try {
        const data = await api("POST", "/api/vote", body);
        showProgress(data.progress);
        break;
      } catch (err) {
        if (err.status === 409) break;  // already answered (another tab): move on
        if (err.status !== undefined || attempt >= 3) {
          showError(`Your vote was not saved: ${err.message}`);
          busy = false;
          setButtons();
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
      }
    }
    busy = false;
    await loadNext();
  }

  function start(name) {
    labeller = name.trim();
    localStorage.setItem(NAME_KEY, labeller);
    $("labeller-name").textContent = labeller;
    $("whoami").hidden = false;
    $("login").hidden = true;
    loadNext();
  }

  function init() {
    token = readToken();
    const options = $("rating-options");
    for (let value = 1; value <= 7; value++) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio";
      input.name = "rating";
      input.value = String(value);
      input.id = `rating-${value}`;
      input.addEventListener("change", () => setRating(value));
      label.append(input, document.createTextNode(` ${value} `));
      options.append(label);
    }
    $("rating-clear").addEventListener("click", () => setRating(null));
    for (const button of document.querySelectorAll(".choices button")) {
      button.addEventListener("click", () => vote(button.dataset.choice));
    }
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("name-input").value.trim();
      if (!/^[\p{L}\p{N}\p{M}_.@+ -]{1,64}$/u.test(name)) {
        showError("Use 1 to 64 letters, digits, spaces or . _ @ + - in your name.");
        return;
      }
      showError(null);
      start(name);
    });
    $("change-name").addEventListener("click", () => {
      $("login").hidden = false;
      $("task").hidden = true;
      $("whoami").hidden = true;
      current = null;
      $("name-input").value = labeller || "";
      $("name-input").focus();
    });
    document.addEventListener("keydown", (event) => {
      const tag = event.target && event.target.tagName;
      if (tag === "TEXTAREA" || (tag === "INPUT" && event.target.type !== "radio")) {
        if (event.key === "Escape") event.target.blur();
        return;  // typing a note or a name is not a vote
      }
      if (event.ctrlKey || event.metaKey || event.altKey || $("task").hidden) return;
      const choice = KEYS[event.key.toLowerCase()];
      if (choice) {
        event.preventDefault();
        vote(choice);
      }
    });
    setButtons();
    const saved = localStorage.getItem(NAME_KEY);
    if (saved) {
      $("name-input").value = saved;
      start(saved);
    } else {
      $("name-input").focus();
    }
  }

  init();
})();
