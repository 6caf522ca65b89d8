// The search page: query box -> GET /api/search -> ranked moments; the player starts at a moment.
// Plain DOM code, no framework and nothing loaded from elsewhere. Text from the server (video ids,
// queries, errors) is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const page = { config: null, hits: [], selected: -1, stopAt: null, pendingSeek: null };

// Seconds -> mm:ss (h:mm:ss past an hour); a moment's start rounds down and its end up, so the
// shown span always covers the moment.
function clock(seconds, roundUp) {
  const s = roundUp ? Math.ceil(seconds - 1e-6) : Math.floor(seconds + 1e-6);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(2, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function momentText(hit) {
  return `${clock(hit.start, false)}-${clock(hit.end, true)}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", Boolean(isError));
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body && body.error ? body.error : response.statusText);
  return body;
}

async function loadConfig() {
  try {
    const health = await getJson("/healthz");
    page.config = health;
    $("q").maxLength = health.limits.max_query_chars;
    $("k").max = health.limits.max_k;
    const files = health.videos_served === null ? "no video files (start with --videos DIR to watch)"
      : `${health.videos_served} playable`;
    // The run's last two path parts name it well enough; the whole path is in the tooltip.
    const model = health.model.split("/").slice(-2).join("/");
    $("status").textContent = `${health.videos} videos indexed · ${files} · model ${model}`;
    $("status").title = `model ${health.model}, index ${health.index}`;
  } catch (e) {
    $("status").textContent = `service not reachable: ${e.message}`;
  }
}

function renderHit(hit, i) {
  const item = el("li", "hit");
  item.tabIndex = 0;
  item.dataset.rank = hit.rank;
  item.dataset.videoId = hit.video_id;
  item.dataset.start = hit.start;
  item.dataset.end = hit.end;
  if (hit.thumbnail_url) {
    const img = el("img", "thumb");
    img.src = hit.thumbnail_url;
    img.alt = `frame of ${hit.video_id} at ${clock(hit.start, false)}`;
    img.loading = "lazy";
    item.append(img);
  } else {
    item.append(el("div", "thumb none", "no video"));
  }
  const meta = el("div", "meta");
  const title = el("div", "title");
  title.append(el("span", "rank", `${hit.rank}`), el("span", "video-id", hit.video_id));
  const detail = el("div", "detail");
  detail.append(el("span", "moment", momentText(hit)),
                el("span", "score", `score ${hit.score.toFixed(3)}`),
                el("span", "branch", hit.branch));
  const bar = el("div", "bar");
  const fill = el("div", "fill");
  const best = page.hits.length ? Math.max(page.hits[0].score, 1e-6) : 1;
  fill.style.width = `${Math.max(0, Math.min(1, hit.score / best)) * 100}%`;
  bar.append(fill);
  meta.append(title, detail, bar);
  item.append(meta);
  item.addEventListener("click", () => select(i));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") select(i); });
  return item;
}

function render(data) {
  page.hits = data.hits;
  page.selected = -1;
  const list = $("results");
  list.replaceChildren(...data.hits.map(renderHit));
  if (!data.hits.length) {
    say("no results");
    return;
  }
  const t = data.timing, others = t.batch_queries - 1;
  const shared = others ? ` · one encoder call shared with ${others} other ` +
                          `${others === 1 ? "query" : "queries"}` : "";
  say(`${data.hits.length} moments for “${data.query}” · ${t.compute_ms.toFixed(0)} ms${shared}`);
  select(0);
}

// Starts the player at the moment: load the file (range requests), then seek to the start.
function select(i) {
  const hit = page.hits[i];
  page.selected = i;
  for (const [j, item] of [...$("results").children].entries()) {
    item.classList.toggle("selected", j === i);
  }
  $("now-id").textContent = hit.video_id;
  $("now-moment").textContent = momentText(hit);
  $("now-score").textContent = `score ${hit.score.toFixed(3)} (clip ${hit.clip_score.toFixed(3)}, ` +
                               `frame ${hit.frame_score.toFixed(3)})`;
  $("now-query").textContent = `“${hit.query}” · rank ${hit.rank} · ${hit.branch} branch`;
  const pane = $("player-pane");
  if (!hit.video_url) {
    pane.hidden = true;
    $("player").removeAttribute("src");
    $("player").dataset.state = "no-file";
    return;
  }
  pane.hidden = false;
  const player = $("player");
  player.pause();
  page.stopAt = $("stop-at-end").checked ? hit.end : null;
  player.dataset.state = "seeking";
  player.dataset.videoId = hit.video_id;
  player.dataset.start = hit.start;
  const target = new URL(hit.video_url, location.href).href;
  if (player.src !== target) {
    page.pendingSeek = hit.start;
    player.src = target;
  } else if (player.readyState >= 1) {
    player.currentTime = hit.start;
    drawTimeline();
  } else {
    page.pendingSeek = hit.start;
  }
}

// The selected moment as a span of the video's timeline (once the duration is known).
function drawTimeline() {
  const player = $("player"), hit = page.hits[page.selected], span = $("timeline-moment");
  const duration = player.duration;
  if (!hit || !Number.isFinite(duration) || duration <= 0) {
    span.style.width = "0";
    return;
  }
  span.style.left = `${Math.min(1, hit.start / duration) * 100}%`;
  span.style.width = `${Math.max(0.005, Math.min(1, (hit.end - hit.start) / duration)) * 100}%`;
}

function setUpPlayer() {
  const player = $("player");
  player.addEventListener("durationchange", drawTimeline);
  player.addEventListener("loadedmetadata", () => {
    if (page.pendingSeek !== null) {
      player.currentTime = page.pendingSeek;
      page.pendingSeek = null;
    }
  });
  player.addEventListener("seeked", () => {
    if (page.pendingSeek === null) player.dataset.state = "ready";
  });
  player.addEventListener("timeupdate", () => {
    if (page.stopAt !== null && !player.paused && player.currentTime >= page.stopAt) {
      player.pause();
      page.stopAt = null;  // playing on from here is the viewer's choice
    }
  });
  player.addEventListener("error", () => {
    player.dataset.state = "error";
    say(`cannot play ${player.dataset.videoId} in this browser`, true);
  });
}

async function search(text, k) {
  say("searching…");
  $("go").disabled = true;
  try {
    const data = await getJson(`/api/search?q=${encodeURIComponent(text)}&k=${k}`);
    history.replaceState(null, "", `?q=${encodeURIComponent(text)}&k=${k}`);
    render(data);
  } catch (e) {
    say(e.message, true);
  } finally {
    $("go").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  setUpPlayer();
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("q").value.trim();
    if (text) search(text, Number($("k").value) || 10);
  });
  await loadConfig();
  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    $("q").value = params.get("q");
    if (params.get("k")) $("k").value = params.get("k");
    search(params.get("q"), Number(params.get("k")) || 10);
  }
});
