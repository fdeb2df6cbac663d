/*
 * Image search page.
 *
 * Flow: the person picks, drops or pastes photos -> each photo gets a result row at once
 * (preview from an object URL, no upload needed) -> all photos go to the server in ONE
 * POST /search (field `files` repeated) -> each row is filled with its matches or its error.
 * Phrases typed in the search box (Enter) and "Similar" on a result (GET /images/{id}/similar)
 * add rows the same way: every new query adds a row, nothing added wipes the earlier rows;
 * "Clear" starts over. In "combine" mode the queries of the search are chips with weights, sent to
 * POST /search/combined, answered as one row. Every search carries the filters: a folder
 * (`prefix`, from GET /folders) and "hide near-duplicates" (`dedup=true`).
 *
 * Writes, when /info says they are on: "Add to collection" uploads files one by one to POST /images
 * (progress and each file's outcome shown) and "Remove" on a result sends DELETE /images/{id}. The
 * write token is asked once and kept for the tab (sessionStorage), sent as `Authorization: Bearer`.
 *
 * Plain browser JavaScript, no build step, no third-party code, no requests to other origins.
 */
"use strict";

(function () {
  // Used until GET /info answers (or if it fails), so the page stays usable.
  const FALLBACK_INFO = {
    model: null, index_size: null, max_k: 100, default_k: 5,
    max_files: 16, max_file_bytes: 10 * 1024 * 1024,
    text_search: true, max_text_chars: 1000, max_texts: 16, writes: false,
  };
  // Where the write token is kept: this tab only, gone when it closes.
  const TOKEN_KEY = "image-search.write-token";
  // Combined searches: weights move in these steps, within these bounds.
  const WEIGHT_STEP = 0.5;
  const MAX_WEIGHT = 5;

  const state = {
    info: { ...FALLBACK_INFO },
    infoLoaded: false,
    // The current queries, in the order they were added (one row each):
    // [{ kind: "file", file, previewUrl, row, clientError, weight }
    //  | { kind: "text", text, row, clientError, weight }
    //  | { kind: "similar", id, path, name, url, thumbUrl, file?, row, clientError, weight }]
    queries: [],
    // Filters of every search: a folder prefix ("" = all) and whether near-duplicates collapse.
    prefix: "",
    dedup: false,
    folders: [],
    // The write token when the person has typed it (also in sessionStorage), and the pending ask.
    token: null,
    tokenResolve: null,
    uploading: false,
    // Combine mode: one row (combinedRow) for the weighted sum of all queries.
    combine: false,
    combinedRow: null,
    // Each search gets a number; answers of superseded searches are ignored.
    searchSeq: 0,
    searchedK: null,
    controller: null,
  };

  const el = {};

  document.addEventListener("DOMContentLoaded", init);

  function init() {
    for (const id of [
      "drop-zone", "file-input", "k-input", "search-button", "clear-button", "search-status",
      "search-status-text", "results", "empty-state", "empty-index-info", "index-info", "limits-hint",
      "lightbox", "lightbox-image", "lightbox-caption", "lightbox-open", "lightbox-close",
      "result-row-template", "demo-banner", "k-note", "combined-row-template", "chip-template", "text-form",
      "text-input", "text-button", "text-hint", "combine-input", "rows-hint", "folder-control", "folder-select",
      "dedup-input", "collection-panel", "add-button", "forget-token-button", "add-file-input", "add-progress-box",
      "add-progress", "add-progress-label", "collection-status", "add-outcomes", "token-dialog", "token-form",
      "token-message", "token-input", "token-cancel",
    ]) {
      el[camel(id)] = document.getElementById(id);
    }
    bindPicker();
    bindDragAndDrop();
    bindPaste();
    bindControls();
    bindTextSearch();
    bindCombine();
    bindLightbox();
    bindFilters();
    bindMatchActions();
    bindWrites();
    setStatus("idle", "");
    loadInfo().then(loadFolders);
  }

  // ---------------------------------------------------------------- /info

  // `refresh`: after a write, only the numbers change; the k the person typed stays.
  async function loadInfo(refresh = false) {
    try {
      const response = await fetch("info", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const info = await response.json();
      state.info = { ...FALLBACK_INFO, ...info };
      state.infoLoaded = true;
      renderInfo();
    } catch (err) {
      el.indexInfo.textContent = "Index details are unavailable right now.";
      el.emptyIndexInfo.textContent = "";
    }
    if (!refresh) applyKLimits();
  }

  function renderInfo() {
    const { index_size: size, model } = state.info;
    // Offline demo data (random CLIP): say so plainly, or its 0.98 scores would look meaningful.
    el.demoBanner.hidden = !state.info.demo_data;
    const count = formatCount(size, "image", "images");
    const modelName = modelLabel(model);
    el.indexInfo.replaceChildren(
      strong(count), document.createTextNode(" indexed · searched with "), strong(modelName),
    );
    el.indexInfo.title = [
      state.info.index_type && "Index type: " + state.info.index_type,
      state.info.index_version && "Index version: " + state.info.index_version,
      state.info.embedding_dim && "Embedding size: " + state.info.embedding_dim,
    ].filter(Boolean).join("\n");
    el.emptyIndexInfo.textContent = size === 0
      ? "The index is empty, so there is nothing to match against yet."
      : `The collection has ${count}, indexed with ${modelName}.`;
    el.limitsHint.textContent =
      `Up to ${state.info.max_files} photos at once, ${formatBytes(state.info.max_file_bytes)} each.`;
    renderTextAvailability();
    renderWritesAvailability();
  }

  // The name /info gives (never a server path). A bare folder name such as "model" says nothing, and
  // after the word "model" read "model model": then the page says what it is instead.
  function modelLabel(model) {
    const name = String(model || "").trim();
    if (!name) return "an unknown model";
    if (/^(model|checkpoint|clip)s?$/i.test(name)) return "an unnamed CLIP model";
    return name;
  }

  // A checkpoint without a text tower still serves photos; the search box says so instead.
  function renderTextAvailability() {
    const available = state.info.text_search !== false;
    el.textInput.disabled = !available;
    el.textButton.disabled = !available;
    el.textForm.classList.toggle("is-disabled", !available);
    el.textInput.maxLength = state.info.max_text_chars || FALLBACK_INFO.max_text_chars;
    el.textHint.textContent = available
      ? "Press Enter to search; each phrase gets its own row."
      : "Search by words is off: this model has no text encoder. Photos still work.";
  }

  // The k control: default from /info, never more than max_k.
  function applyKLimits() {
    el.kInput.max = String(state.info.max_k);
    el.kInput.value = String(clamp(state.info.default_k, 1, state.info.max_k));
  }

  function currentK() {
    const raw = parseInt(el.kInput.value, 10);
    const k = clamp(Number.isFinite(raw) ? raw : state.info.default_k, 1, state.info.max_k);
    el.kInput.value = String(k); // show the value actually used
    // Say why the number changed, rather than silently searching with another one: both ways. Only a
    // newly typed number changes the note (Enter and `change` both fire for one edit; the second one
    // sees the corrected value and must not wipe what the first said).
    if (el.kInput.dataset.typed !== "true") return k;
    if (Number.isFinite(raw) && raw > state.info.max_k) {
      el.kNote.textContent = `Capped at ${state.info.max_k}, the most this index answers.`;
    } else if (Number.isFinite(raw) && raw < 1) {
      el.kNote.textContent = `Raised to 1: ${raw} matches would show nothing, so each search shows at least one.`;
    } else if (!Number.isFinite(raw)) {
      el.kNote.textContent = `Not a number, so the default of ${k} is used.`;
    } else {
      el.kNote.textContent = "";
    }
    el.kInput.dataset.typed = "false";
    el.kNote.classList.toggle("is-shown", Boolean(el.kNote.textContent));
    return k;
  }

  // ---------------------------------------------------------------- choosing photos

  function bindPicker() {
    el.dropZone.addEventListener("click", openPicker);
    el.dropZone.addEventListener("keydown", (event) => {
      // role="button" must behave like a button for keyboard users.
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        openPicker();
      }
    });
    el.fileInput.addEventListener("change", () => {
      const files = Array.from(el.fileInput.files || []);
      // Reset so choosing the same file again still fires `change`.
      el.fileInput.value = "";
      if (files.length) startWithFiles(files);
    });
  }

  function openPicker() {
    el.fileInput.click();
  }

  function bindDragAndDrop() {
    // Depth counter: dragenter/dragleave also fire for child elements.
    let depth = 0;
    const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");

    window.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth += 1;
      el.dropZone.classList.add("is-dragover");
    });
    window.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault(); // allow dropping anywhere on the page
      event.dataTransfer.dropEffect = "copy";
    });
    window.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) el.dropZone.classList.remove("is-dragover");
    });
    window.addEventListener("drop", (event) => {
      // Without preventDefault the browser would navigate away to the dropped file.
      event.preventDefault();
      depth = 0;
      el.dropZone.classList.remove("is-dragover");
      const files = Array.from(event.dataTransfer?.files || []);
      if (files.length) startWithFiles(files);
    });
  }

  function bindPaste() {
    document.addEventListener("paste", (event) => {
      // Let people paste text into the k field and the search box as usual.
      if (event.target === el.kInput || event.target === el.textInput) return;
      const files = Array.from(event.clipboardData?.files || []);
      if (!files.length) return;
      event.preventDefault();
      startWithFiles(files.map(nameClipboardFile));
    });
  }

  // Clipboard images are usually all called "image.png"; give them a clearer name.
  function nameClipboardFile(file, i) {
    if (file.name && file.name !== "image.png") return file;
    const ext = (file.type.split("/")[1] || "png").replace("jpeg", "jpg");
    return new File([file], `pasted-image-${i + 1}.${ext}`, { type: file.type });
  }

  function bindControls() {
    // Changing k re-runs the search for the photos already chosen. Enter and `change` can
    // both fire for one edit, so only a k different from the last search's starts a new one.
    const searchIfKChanged = () => {
      const k = currentK(); // also says when the typed number was changed
      if (state.queries.length && k !== state.searchedK) runSearch();
    };
    el.kInput.addEventListener("input", () => { el.kInput.dataset.typed = "true"; });
    el.kInput.addEventListener("change", searchIfKChanged);
    el.kInput.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        searchIfKChanged();
      }
    });
    el.searchButton.addEventListener("click", () => {
      if (state.queries.length) runSearch();
    });
    el.clearButton.addEventListener("click", clearAll);
  }

  // ---------------------------------------------------------------- rows

  // New photos join the current search as rows of their own, after the earlier rows: the same rule
  // as for phrases and "Similar" (the page says so in #rows-hint). "Clear" starts over.
  function startWithFiles(files) {
    let accepted = state.queries.filter((q) => q.kind === "file" && !q.clientError).length;
    const added = files.map((file) => {
      const clientError = checkFileLocally(file, accepted);
      if (!clientError) accepted += 1;
      return { kind: "file", file, previewUrl: URL.createObjectURL(file), row: null, clientError, weight: 1 };
    });
    state.queries.push(...added);
    showQueries();
    runSearch();
  }

  // "Similar" on a result: more like that image of the collection, as a row (or chip) of its own.
  function addSimilar(match) {
    state.queries.push({
      kind: "similar", id: match.id, path: match.path, name: match.name, url: match.url,
      thumbUrl: match.thumbUrl, row: null, clientError: null, weight: 1,
    });
    showQueries();
    runSearch();
  }

  // A phrase joins the current search (photos and earlier phrases stay) as a row of its own.
  function addText(text) {
    const texts = state.queries.filter((q) => q.kind === "text" && !q.clientError).length;
    state.queries.push({ kind: "text", text, row: null, clientError: checkTextLocally(text, texts), weight: 1 });
    showQueries();
    runSearch();
  }

  function bindTextSearch() {
    el.textForm.addEventListener("submit", (event) => {
      event.preventDefault(); // never a navigation: the page sends the search itself
      const text = el.textInput.value;
      if (!text.trim()) {
        el.textInput.focus();
        return;
      }
      el.textInput.value = "";
      addText(text.trim());
    });
  }

  function bindCombine() {
    el.combineInput.addEventListener("change", () => {
      state.combine = el.combineInput.checked;
      if (!state.queries.length) return;
      showQueries();
      runSearch();
    });
  }

  // (Re)builds the rows for the current queries: one per query, or one combined row.
  function showQueries() {
    abortSearch();
    el.results.replaceChildren();
    state.combinedRow = null;
    for (const query of state.queries) query.row = null;
    if (state.combine) {
      state.combinedRow = createCombinedRow();
      el.results.append(state.combinedRow);
    } else {
      for (const query of state.queries) {
        query.row = createRow(query);
        el.results.append(query.row);
      }
    }
    const any = state.queries.length > 0;
    el.emptyState.hidden = any;
    el.searchButton.disabled = !any;
    el.clearButton.disabled = !any;
  }

  // Checks worth doing before uploading (they save a doomed upload); the server still
  // decides, and its errors are shown the same way. `accepted`: files already going up.
  function checkFileLocally(file, accepted) {
    const { max_files: maxFiles, max_file_bytes: maxBytes } = state.info;
    if (file.size === 0) return { code: "empty_file" };
    if (file.size > maxBytes) return { code: "file_too_large", size: file.size };
    if (accepted >= maxFiles) return { code: "over_file_limit" };
    return null;
  }

  function checkTextLocally(text, accepted) {
    const { max_text_chars: maxChars, max_texts: maxTexts } = state.info;
    if (maxChars && [...text].length > maxChars) return { code: "text_too_long" };
    if (maxTexts && accepted >= maxTexts) return { code: "over_text_limit" };
    return null;
  }

  function queryName(query) {
    if (query.kind === "text") return query.text;
    if (query.kind === "similar") return query.name;
    return query.file.name || "Pasted image";
  }

  function createRow(query) {
    const row = el.resultRowTemplate.content.firstElementChild.cloneNode(true);
    if (query.kind === "text") return fillTextRow(row, query.text);
    if (query.kind === "similar") return fillSimilarRow(row, query);
    const name = query.file.name || "Pasted image";
    row.dataset.filename = name;
    const image = row.querySelector(".query-image");
    image.alt = `Your photo: ${name}`;
    // Files the browser cannot decode (often the very ones the server rejects) get a
    // neutral placeholder instead of a broken-image icon.
    image.addEventListener("error", () => row.classList.add("no-preview"), { once: true });
    image.src = query.previewUrl;
    const caption = row.querySelector(".query-name");
    caption.textContent = name;
    caption.title = name;
    return row;
  }

  // "More like this": the collection image's thumbnail where a photo's preview would be.
  function fillSimilarRow(row, query) {
    row.classList.add("similar-row");
    row.dataset.similarTo = String(query.id);
    const image = row.querySelector(".query-image");
    image.alt = `Collection image: ${query.name}`;
    image.addEventListener("error", () => row.classList.add("no-preview"), { once: true });
    image.src = query.thumbUrl;
    const kind = document.createElement("p");
    kind.className = "query-kind";
    kind.textContent = "More like this";
    row.querySelector(".query").prepend(kind);
    const caption = row.querySelector(".query-name");
    caption.textContent = query.name;
    caption.title = query.path;
    return row;
  }

  // A phrase's row: the words where a photo's preview would be.
  function fillTextRow(row, text) {
    row.classList.add("text-row-result");
    row.dataset.text = text;
    row.querySelector(".query-image").remove();
    row.querySelector(".query-placeholder").remove();
    const quote = row.querySelector(".query-text");
    quote.hidden = false;
    const words = document.createElement("span"); // an inline box, so the quote marks wrap with the words
    words.textContent = text;
    quote.replaceChildren(words);
    quote.title = text;
    const caption = row.querySelector(".query-name");
    caption.textContent = "Search by words";
    return row;
  }

  function createCombinedRow() {
    const row = el.combinedRowTemplate.content.firstElementChild.cloneNode(true);
    const chips = row.querySelector(".chips");
    for (const query of state.queries) chips.append(createChip(query));
    return row;
  }

  // A query of a combined search: its preview or words, its weight with - and +, and a remove button.
  function createChip(query) {
    const chip = el.chipTemplate.content.firstElementChild.cloneNode(true);
    const name = queryName(query);
    chip.dataset.kind = query.kind;
    chip.dataset.name = name;
    const image = chip.querySelector(".chip-image");
    const words = chip.querySelector(".chip-text");
    if (query.kind === "file" || query.kind === "similar") {
      image.src = query.kind === "file" ? query.previewUrl : query.thumbUrl;
      image.alt = query.kind === "file" ? `Your photo: ${name}` : `Collection image: ${name}`;
      words.textContent = name;
      words.classList.add("chip-filename");
    } else {
      image.remove();
      words.textContent = `“${name}”`;
    }
    chip.title = name;
    if (query.clientError) {
      chip.classList.add("has-error");
      chip.title = `${name}: ${friendlyMessage(query.clientError)}`;
    }
    const minus = chip.querySelector(".chip-minus");
    const plus = chip.querySelector(".chip-plus");
    minus.setAttribute("aria-label", `Lower the weight of ${name}`);
    plus.setAttribute("aria-label", `Raise the weight of ${name}`);
    chip.querySelector(".chip-remove").setAttribute("aria-label", `Remove ${name} from the search`);
    minus.addEventListener("click", () => changeWeight(query, chip, -WEIGHT_STEP));
    plus.addEventListener("click", () => changeWeight(query, chip, +WEIGHT_STEP));
    chip.querySelector(".chip-remove").addEventListener("click", () => removeQuery(query));
    showWeight(query, chip);
    return chip;
  }

  function showWeight(query, chip) {
    const output = chip.querySelector(".chip-weight");
    output.textContent = formatWeight(query.weight);
    output.setAttribute("aria-label", `Weight ${formatWeight(query.weight)}`);
    chip.dataset.weight = String(query.weight);
    chip.classList.toggle("is-negative", query.weight < 0);
    chip.classList.toggle("is-zero", query.weight === 0);
    chip.querySelector(".chip-minus").disabled = query.weight <= -MAX_WEIGHT;
    chip.querySelector(".chip-plus").disabled = query.weight >= MAX_WEIGHT;
  }

  function changeWeight(query, chip, step) {
    query.weight = clamp(Math.round((query.weight + step) / WEIGHT_STEP) * WEIGHT_STEP, -MAX_WEIGHT, MAX_WEIGHT);
    showWeight(query, chip);
    runSearch();
  }

  function removeQuery(query) {
    if (query.previewUrl) URL.revokeObjectURL(query.previewUrl);
    state.queries = state.queries.filter((q) => q !== query);
    if (!state.queries.length) {
      clearAll();
      return;
    }
    showQueries();
    runSearch();
  }

  function clearQueries() {
    abortSearch();
    for (const query of state.queries) if (query.previewUrl) URL.revokeObjectURL(query.previewUrl);
    state.queries = [];
    state.combinedRow = null;
    el.results.replaceChildren();
  }

  function clearAll() {
    clearQueries();
    el.emptyState.hidden = false;
    el.searchButton.disabled = true;
    el.clearButton.disabled = true;
    setBusy(false, "");
    el.dropZone.focus();
  }

  function setRowPending(row) {
    row.dataset.state = "pending";
    row.querySelector(".row-status").textContent = "Searching…";
    row.querySelector(".matches").replaceChildren();
    row.querySelector(".result-error")?.remove();
  }

  function setRowMatches(row, matches, truncated = false, filters = {}) {
    row.dataset.state = "done";
    row.querySelector(".result-error")?.remove();
    const status = row.querySelector(".row-status");
    const where = filters.prefix ? ` in ${filters.prefix}` : "";
    status.textContent = matches.length
      ? `Top ${matches.length} ${matches.length === 1 ? "match" : "matches"}${where}`
      : `No matches found${where}.`;
    if (filters.dedup) status.textContent += " · near-duplicates hidden";
    // The model reads a limited number of words; say when the end of a phrase was left out.
    row.dataset.truncated = String(Boolean(truncated));
    if (truncated) status.textContent += " · only the beginning of this long text was used";
    const labels = matchLabels(matches);
    row.querySelector(".matches").replaceChildren(...matches.map((match, i) => renderMatch(match, i, labels[i])));
  }

  function setRowError(row, error) {
    row.dataset.state = "error";
    row.querySelector(".row-status").textContent = "";
    row.querySelector(".matches").replaceChildren();
    row.querySelector(".result-error")?.remove();

    const box = document.createElement("div");
    box.className = "result-error";
    box.setAttribute("role", "alert");
    box.dataset.code = error.code || "";
    const text = document.createElement("span");
    text.textContent = friendlyMessage(error);
    box.append(text);
    const detail = serverDetail(error);
    if (detail) {
      const small = document.createElement("span");
      small.className = "error-detail";
      small.textContent = detail;
      text.append(small);
    }
    row.querySelector(".row-body").append(box);
  }

  // A match is named by its file name; where two matches of a row share one, by enough of their
  // folders to tell them apart (holiday/IMG_0001.jpg vs work/IMG_0001.jpg).
  function matchLabels(matches) {
    const parts = matches.map((match) => String(match.path || "").split(/[\\/]/).filter(Boolean));
    return parts.map((mine, i) => {
      let depth = 1;
      const clashes = (d) => parts.some((other, j) => j !== i && other.slice(-d).join("/") === mine.slice(-d).join("/"));
      while (depth < mine.length && clashes(depth)) depth += 1;
      return mine.slice(-depth).join("/") || `Image ${matches[i].id}`;
    });
  }

  // Each match: its link (lightbox), and below it "Similar" and, when writes are on, "Remove".
  function renderMatch(match, index, label) {
    const item = document.createElement("li");
    const name = label || basename(match.path) || `Image ${match.id}`;
    const score = Number(match.score);

    // A real link: works without JS, middle-click/ctrl-click opens a new tab; a plain
    // click opens the lightbox instead (see bindLightbox).
    const link = document.createElement("a");
    link.className = "match";
    link.href = match.url;
    link.target = "_blank";
    link.rel = "noopener";
    link.dataset.id = String(match.id);
    link.dataset.name = name;
    link.title = `${match.path} (similarity ${formatScore(score)})`;

    const image = document.createElement("img");
    // Only the server's thumbnail is ever loaded here, never the full-size image.
    image.src = match.thumbnail_url;
    image.alt = `Match ${index + 1}: ${name}, similarity ${formatScore(score)}`;
    image.loading = "lazy";
    image.decoding = "async";
    image.width = 256;
    image.height = 256;

    const meta = document.createElement("span");
    meta.className = "match-meta";
    const scoreText = document.createElement("span");
    scoreText.className = "score";
    scoreText.textContent = formatScore(score);
    scoreText.setAttribute("aria-hidden", "true"); // already part of the alt text
    const bar = document.createElement("span");
    bar.className = "score-bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.round(clamp(score, 0, 1) * 100)}%`;
    bar.append(fill);
    const nameText = document.createElement("span");
    nameText.className = "match-name";
    nameText.textContent = name;

    meta.append(scoreText, bar, nameText);
    // De-duplicated answers name the near-duplicates each match stands for.
    const duplicates = Array.isArray(match.duplicates) ? match.duplicates.length : 0;
    if (duplicates) {
      const dups = document.createElement("span");
      dups.className = "match-duplicates";
      dups.textContent = `+${duplicates} near-duplicate${duplicates === 1 ? "" : "s"} hidden`;
      meta.append(dups);
      link.title += `; stands for ${formatCount(duplicates, "near-duplicate", "near-duplicates")}`;
    }
    link.append(image, meta);

    const actions = document.createElement("span");
    actions.className = "match-actions";
    const similar = document.createElement("button");
    similar.type = "button";
    similar.className = "match-action match-similar";
    similar.textContent = "Similar";
    similar.setAttribute("aria-label", `More like ${name}`);
    actions.append(similar);
    if (state.info.writes) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "match-action match-remove";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove ${name} from the collection`);
      actions.append(remove);
    }
    item.dataset.id = String(match.id);
    item.dataset.path = String(match.path || "");
    item.dataset.name = name;
    item.dataset.url = match.url;
    item.dataset.thumbUrl = match.thumbnail_url;
    item.append(link, actions);
    return item;
  }

  // ---------------------------------------------------------------- searching

  function abortSearch() {
    if (state.controller) state.controller.abort();
    state.controller = null;
  }

  async function runSearch() {
    // A new search supersedes any running one (new photos, or a new k).
    abortSearch();
    const seq = ++state.searchSeq;
    const controller = new AbortController();
    state.controller = controller;

    const k = currentK();
    state.searchedK = k;
    if (state.combine) {
      await runCombined(seq, controller, k);
      return;
    }
    const toSend = [];
    for (const query of state.queries) {
      if (query.clientError) {
        setRowError(query.row, query.clientError);
      } else {
        setRowPending(query.row);
        toSend.push(query);
      }
    }
    if (!toSend.length) {
      setBusy(false, "None of the chosen photos or phrases can be searched.", true);
      return;
    }

    setBusy(true, `Searching ${describeQueries(toSend)}…`);
    const started = performance.now();
    const filters = currentFilters();
    // Photos and phrases in one POST /search (photos first, as the server answers them, whatever the
    // rows' order); each "Similar" row in a GET of its own, all at once.
    const form = [...toSend.filter((q) => q.kind === "file"), ...toSend.filter((q) => q.kind === "text")];
    const tasks = [];
    if (form.length) tasks.push(postSearch(form, k, controller.signal).then((outcome) => ({ queries: form, outcome })));
    for (const query of toSend.filter((q) => q.kind === "similar")) {
      tasks.push(getSimilar(query, k, controller.signal).then((outcome) => ({ queries: [query], outcome })));
    }
    let outcomes;
    try {
      outcomes = await Promise.all(tasks);
    } catch (err) {
      if (err.name === "AbortError") return; // superseded; the newer search owns the page
      outcomes = [{ queries: toSend, outcome: { requestError: { code: "network_error" } } }];
    }
    if (seq !== state.searchSeq) return;
    state.controller = null;
    applyOutcomes(toSend, outcomes, filters, performance.now() - started);
  }

  function describeQueries(queries) {
    const files = queries.filter((q) => q.kind === "file").length;
    const texts = queries.filter((q) => q.kind === "text").length;
    const similar = queries.length - files - texts;
    const parts = [
      files && formatCount(files, "photo", "photos"),
      texts && formatCount(texts, "phrase", "phrases"),
      similar && formatCount(similar, "collection image", "collection images"),
    ].filter(Boolean);
    return parts.length > 1 ? `${parts.slice(0, -1).join(", ")} and ${parts[parts.length - 1]}` : parts[0] || "";
  }

  // One request for all photos and phrases: the fields `files` and `text` are repeated, in row
  // order (photos first, as state.queries keeps them).
  async function postSearch(queries, k, signal) {
    return postForm(`search?${searchParams(k)}`, queries, signal, false);
  }

  // The filters as they are now, and the query string of a search with them (k first).
  function currentFilters() {
    return { prefix: state.prefix, dedup: state.dedup };
  }

  function searchParams(k) {
    const params = new URLSearchParams({ k: String(k) });
    if (state.prefix) params.append("prefix", state.prefix);
    if (state.dedup) params.set("dedup", "true");
    return params.toString();
  }

  // GET images/{id}/similar: the server leaves the image itself out of its own matches.
  async function getSimilar(query, k, signal) {
    const response = await fetch(`images/${encodeURIComponent(query.id)}/similar?${searchParams(k)}`, {
      signal, headers: { Accept: "application/json" },
    });
    return toOutcome(response, await readBody(response));
  }

  async function postForm(url, queries, signal, withWeights) {
    const form = new FormData();
    for (const query of queries) {
      // Photos, and in combine mode the collection images of "Similar" (their bytes, fetched once).
      if (!query.file || query.kind === "text") continue;
      form.append("files", query.file, query.file.name || "image");
      if (withWeights) form.append("file_weight", String(query.weight));
    }
    for (const query of queries) {
      if (query.kind !== "text") continue;
      form.append("text", query.text);
      if (withWeights) form.append("text_weight", String(query.weight));
    }
    const response = await fetch(url, {
      method: "POST",
      body: form,
      signal,
      headers: { Accept: "application/json" },
    });
    return toOutcome(response, await readBody(response));
  }

  function toOutcome(response, body) {
    // Per-file results may come with a 200 (some failed) or, if the server chooses, a 4xx.
    if (body && Array.isArray(body.results)) return { results: body.results };
    const error = (body && body.error) || {};
    return {
      requestError: {
        code: error.code || statusToCode(response.status),
        message: error.message || null,
        filename: error.filename ?? null,
        status: response.status,
        retryAfter: response.headers.get("Retry-After"),
      },
    };
  }

  // Error bodies are JSON from our API but may be plain text (e.g. Ray Serve's own 503).
  async function readBody(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  }

  // Combine mode: all usable queries, with their weights, in one request; one row of results.
  async function runCombined(seq, controller, k) {
    const row = state.combinedRow;
    const toSend = state.queries.filter((q) => !q.clientError);
    if (!toSend.length) {
      setRowError(row, state.queries[0]?.clientError || { code: "no_query" });
      setBusy(false, "None of the chosen photos or phrases can be searched.", true);
      return;
    }
    setRowPending(row);
    setBusy(true, `Searching ${describeQueries(toSend)} combined…`);
    const started = performance.now();
    const filters = currentFilters();
    let outcome;
    try {
      await fetchCollectionImages(toSend, controller.signal);
      outcome = await postForm(`search/combined?${searchParams(k)}`, toSend, controller.signal, true);
    } catch (err) {
      if (err.name === "AbortError") return;
      outcome = { requestError: { code: "network_error" } };
    }
    if (seq !== state.searchSeq) return;
    state.controller = null;
    const entry = outcome.results && outcome.results[0];
    if (entry && Array.isArray(entry.matches)) {
      setRowMatches(row, entry.matches, false, filters);
      const skipped = state.queries.length - toSend.length;
      setBusy(false, skipped
        ? `Combined ${describeQueries(toSend)}; ${formatCount(skipped, "query", "queries")} left out (see the marked chips).`
        : `Found matches for ${describeQueries(toSend)} combined in ${formatDuration(performance.now() - started)}.`);
    } else {
      const error = (entry && entry.error) || outcome.requestError || { code: "missing_result" };
      setRowError(row, error);
      setBusy(false, friendlyMessage(error), true);
    }
  }

  // A combined search takes photos and phrases: a "Similar" image goes in as its own bytes.
  async function fetchCollectionImages(queries, signal) {
    await Promise.all(queries.filter((q) => q.kind === "similar" && !q.file).map(async (query) => {
      const response = await fetch(query.url, { signal });
      if (!response.ok) throw new Error(`HTTP ${response.status} for ${query.url}`);
      const blob = await response.blob();
      query.file = new File([blob], basename(query.path) || `image-${query.id}`, { type: blob.type });
    }));
  }

  function statusToCode(status) {
    if (status === 503 || status === 429) return "overloaded";
    if (status === 413) return "request_too_large";
    if (status === 415) return "unsupported_format";
    if (status >= 500) return "server_error";
    return "request_failed";
  }

  // One outcome per request (the POST of photos and phrases, one GET per "Similar"); then one status.
  function applyOutcomes(sent, outcomes, filters, elapsedMs) {
    let failed = 0;
    let requestError = null;
    for (const { queries, outcome } of outcomes) {
      if (outcome.results) {
        failed += applyResults(queries, outcome.results, filters);
      } else {
        failed += applyRequestError(queries, outcome.requestError);
        requestError = requestError || outcome.requestError;
      }
    }
    const failedLocally = state.queries.length - sent.length;
    const problems = failed + failedLocally;
    if (problems === 0) {
      setBusy(false, `Found matches for ${describeQueries(sent)} in ${formatDuration(elapsedMs)}.`);
    } else if (problems < state.queries.length) {
      setBusy(false, `${formatCount(problems, "query", "queries")} could not be searched; the others are below.`);
    } else if (requestError && outcomes.length === 1) {
      setBusy(false, friendlyMessage(requestError), true);
    } else {
      setBusy(false, "Nothing could be searched. See the messages below.", true);
    }
  }

  // Entries come back in request order; match them by position, not by (possibly repeated) name.
  function applyResults(queries, results, filters) {
    let failed = 0;
    queries.forEach((query, i) => {
      const entry = results[i];
      if (entry && Array.isArray(entry.matches)) {
        setRowMatches(query.row, entry.matches, entry.truncated === true, filters);
      } else {
        failed += 1;
        setRowError(query.row, (entry && entry.error) || { code: "missing_result" });
      }
    });
    return failed;
  }

  // The whole request failed. A file-level error names one file; put the specific
  // message on that row and a short "not searched" note on the others.
  function applyRequestError(queries, error) {
    const fileLevel = FILE_LEVEL_CODES.has(error.code) && queries.length > 1;
    const culprit = fileLevel && error.filename != null
      ? queries.find((q) => q.kind === "file" && q.file.name === error.filename)
      : null;
    for (const query of queries) {
      if (!culprit || query === culprit) {
        setRowError(query.row, error);
      } else {
        setRowError(query.row, {
          code: "not_searched",
          message: `Not searched: the server turned down the whole upload because of “${error.filename}”. ` +
            "Try again without that photo.",
        });
      }
    }
    return queries.length;
  }

  // ---------------------------------------------------------------- filters

  // GET /folders: the first-level folders of the served version, offered as `prefix` values.
  async function loadFolders() {
    try {
      const response = await fetch("folders", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const body = await response.json();
      state.folders = Array.isArray(body.folders) ? body.folders : [];
    } catch (err) {
      state.folders = [];
    }
    renderFolders();
  }

  function renderFolders() {
    const options = [new Option("All folders", "")];
    for (const folder of state.folders) {
      options.push(new Option(`${folder.prefix} (${formatCount(folder.count, "image", "images")})`, folder.prefix));
    }
    // A chosen folder that has just lost its last image stays chosen (and says it is empty).
    if (state.prefix && !state.folders.some((folder) => folder.prefix === state.prefix)) {
      options.push(new Option(`${state.prefix} (no images)`, state.prefix));
    }
    el.folderSelect.replaceChildren(...options);
    el.folderSelect.value = state.prefix;
    el.folderControl.hidden = state.folders.length === 0 && !state.prefix;
  }

  function bindFilters() {
    el.folderSelect.addEventListener("change", () => {
      state.prefix = el.folderSelect.value;
      if (state.queries.length) runSearch();
    });
    el.dedupInput.addEventListener("change", () => {
      state.dedup = el.dedupInput.checked;
      if (state.queries.length) runSearch();
    });
  }

  // ---------------------------------------------------------------- actions on a match

  function bindMatchActions() {
    el.results.addEventListener("click", (event) => {
      const button = event.target.closest("button.match-action");
      if (!button) return;
      const item = button.closest("li[data-id]");
      const match = {
        id: Number(item.dataset.id), path: item.dataset.path, name: item.dataset.name,
        url: item.dataset.url, thumbUrl: item.dataset.thumbUrl,
      };
      if (button.classList.contains("match-similar")) addSimilar(match);
      else if (button.classList.contains("match-remove")) removeImage(match);
    });
  }

  // ---------------------------------------------------------------- writes

  function renderWritesAvailability() {
    el.collectionPanel.hidden = !state.info.writes;
    el.forgetTokenButton.hidden = !writeToken();
  }

  function writeToken() {
    if (state.token) return state.token;
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null; // storage blocked: the token lives in memory only
    }
  }

  function keepToken(token) {
    state.token = token;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage blocked: memory only
    }
    el.forgetTokenButton.hidden = !token;
  }

  // The token, asked for once (a dialog) and then kept for the tab; null when the person cancels.
  async function ensureToken(why) {
    const kept = writeToken();
    if (kept) return kept;
    const typed = await askToken(why);
    if (typed) keepToken(typed);
    return typed;
  }

  function askToken(message) {
    if (state.tokenResolve) state.tokenResolve(null);
    el.tokenMessage.textContent = message || "";
    el.tokenMessage.classList.remove("is-error");
    el.tokenInput.value = "";
    el.tokenDialog.showModal();
    el.tokenInput.focus();
    return new Promise((resolve) => { state.tokenResolve = resolve; });
  }

  function answerToken(token) {
    const resolve = state.tokenResolve;
    state.tokenResolve = null;
    if (el.tokenDialog.open) el.tokenDialog.close();
    if (resolve) resolve(token);
  }

  function bindWrites() {
    el.addButton.addEventListener("click", () => el.addFileInput.click());
    el.addFileInput.addEventListener("change", () => {
      const files = Array.from(el.addFileInput.files || []);
      el.addFileInput.value = "";
      if (files.length) addToCollection(files);
    });
    el.forgetTokenButton.addEventListener("click", () => {
      keepToken(null);
      setCollectionStatus("The write token is forgotten; it will be asked for again.");
    });
    el.tokenForm.addEventListener("submit", (event) => {
      event.preventDefault(); // the page handles the token itself; nothing is submitted
      const token = el.tokenInput.value.trim();
      if (!token) {
        el.tokenMessage.textContent = "Type the write token first.";
        el.tokenMessage.classList.add("is-error");
        el.tokenInput.focus();
        return;
      }
      answerToken(token);
    });
    el.tokenCancel.addEventListener("click", () => answerToken(null));
    el.tokenDialog.addEventListener("close", () => answerToken(null)); // Escape, or closed by the page
  }

  function setCollectionStatus(text, isError = false) {
    el.collectionStatus.textContent = text;
    el.collectionStatus.classList.toggle("is-error", isError);
  }

  function outcomeItem(name) {
    const item = document.createElement("li");
    item.className = "add-outcome";
    item.dataset.status = "pending";
    item.dataset.filename = name;
    const label = document.createElement("span");
    label.className = "add-outcome-name";
    label.textContent = name;
    const text = document.createElement("span");
    text.className = "add-outcome-text";
    text.textContent = "Waiting…";
    item.append(label, text);
    el.addOutcomes.append(item);
    return item;
  }

  function setOutcome(item, status, text) {
    item.dataset.status = status;
    item.querySelector(".add-outcome-text").textContent = text;
  }

  // POST /images one file at a time: the progress bar moves per file and each file gets its outcome.
  async function addToCollection(files) {
    if (state.uploading) return;
    state.uploading = true;
    el.addButton.disabled = true;
    el.addOutcomes.replaceChildren();
    const items = files.map((file) => outcomeItem(file.name || "Pasted image"));
    el.addProgress.max = files.length;
    el.addProgress.value = 0;
    el.addProgressBox.hidden = false;
    el.addProgressLabel.textContent = `Uploading 0 of ${files.length}…`;
    setCollectionStatus("");
    let added = 0;
    try {
      const token = await ensureToken("Adding images needs the service's write token.");
      if (!token) {
        items.forEach((item) => setOutcome(item, "skipped", "Not added: no write token was given."));
        setCollectionStatus("Nothing was added: adding needs the write token.", true);
        return;
      }
      for (let i = 0; i < files.length; i += 1) {
        el.addProgressLabel.textContent = `Uploading ${i + 1} of ${files.length}: ${files[i].name}`;
        setOutcome(items[i], "pending", "Uploading…");
        const result = await postImage(files[i], token);
        el.addProgress.value = i + 1;
        if (result.unauthorized) {
          keepToken(null);
          for (const item of items.slice(i)) setOutcome(item, "error", "Not added: the write token was not accepted.");
          setCollectionStatus(
            "The write token was not accepted, so nothing more was added. Choose the files again to type it again.",
            true,
          );
          return;
        }
        setOutcome(items[i], result.status, result.text);
        if (result.ok) added += 1;
      }
      el.addProgressLabel.textContent = `Uploaded ${files.length} of ${files.length}.`;
      const failed = files.length - added;
      setCollectionStatus(failed
        ? `${formatCount(added, "file", "files")} added, ${formatCount(failed, "file", "files")} not: see below.`
        : `${formatCount(added, "file", "files")} added to the collection.`, failed > 0);
    } finally {
      state.uploading = false;
      el.addButton.disabled = false;
      if (added) await afterWrite();
    }
  }

  const ADDED_WORDS = {
    added: "Added",
    replaced: "Replaced the earlier image of this name",
    unchanged: "Already in the collection",
  };

  async function postImage(file, token) {
    const form = new FormData();
    form.append("files", file, file.name || "image");
    let response;
    let body;
    try {
      response = await fetch("images", {
        method: "POST", body: form, headers: { Accept: "application/json", Authorization: `Bearer ${token}` },
      });
      body = await readBody(response);
    } catch (err) {
      return { ok: false, status: "error", text: friendlyMessage({ code: "network_error" }) };
    }
    if (response.status === 401) return { unauthorized: true };
    const entry = body && Array.isArray(body.results) ? body.results[0] : null;
    if (entry && !entry.error && entry.status) {
      const words = ADDED_WORDS[entry.status] || entry.status;
      const later = response.status === 202 ? "; searchable in a moment" : "";
      return { ok: true, status: entry.status, text: `${words} as ${entry.key} (id ${entry.id})${later}.` };
    }
    const error = (entry && entry.error) || (body && body.error) || { code: statusToCode(response.status) };
    return {
      ok: false, status: "error",
      text: `Not added: ${friendlyMessage({ ...error, retryAfter: response.headers.get("Retry-After") })}`,
    };
  }

  // DELETE images/{id}, after the person confirms; the rows are searched again without it.
  async function removeImage(match) {
    if (!window.confirm(`Remove ${match.name} from the collection? It is deleted from the index and the store.`)) {
      return;
    }
    const token = await ensureToken("Removing images needs the service's write token.");
    if (!token) {
      setCollectionStatus("Nothing was removed: removing needs the write token.", true);
      return;
    }
    let response;
    let body;
    try {
      response = await fetch(`images/${encodeURIComponent(match.id)}`, {
        method: "DELETE", headers: { Accept: "application/json", Authorization: `Bearer ${token}` },
      });
      body = await readBody(response);
    } catch (err) {
      setCollectionStatus(friendlyMessage({ code: "network_error" }), true);
      return;
    }
    if (response.status === 401) {
      keepToken(null);
      setCollectionStatus(`The write token was not accepted, so ${match.name} was not removed. Try again to type it again.`, true);
      return;
    }
    if (response.ok || response.status === 404) {
      setCollectionStatus(response.ok
        ? `Removed ${match.name} from the collection.`
        : `${match.name} was already removed.`);
      // "Similar" rows about the removed image have nothing left to ask about.
      const gone = state.queries.filter((q) => q.kind === "similar" && q.id === match.id);
      state.queries = state.queries.filter((q) => !gone.includes(q));
      if (gone.length) showQueries();
      await afterWrite();
      return;
    }
    const error = (body && body.error) || { code: statusToCode(response.status) };
    setCollectionStatus(`${match.name} was not removed: ${friendlyMessage({ ...error, retryAfter: response.headers.get("Retry-After") })}`, true);
  }

  // The collection changed: new counts, folders, and the rows searched again against it.
  async function afterWrite() {
    await loadInfo(true);
    await loadFolders();
    if (state.queries.length) runSearch();
  }

  // ---------------------------------------------------------------- messages

  // Codes that describe one file (versus the request as a whole).
  const FILE_LEVEL_CODES = new Set([
    "not_an_image", "corrupt_image", "empty_file", "file_too_large", "too_many_pixels", "unsupported_format",
  ]);

  // Server error codes in words a person understands. Unknown codes fall back to the
  // server's own message, so new backend codes still read sensibly.
  function friendlyMessage(error) {
    const info = state.info;
    const retry = retryAfterText(error.retryAfter);
    switch (error.code) {
      case "not_an_image":
        return "This file isn't an image. Choose a photo such as a JPEG or PNG.";
      case "corrupt_image":
        return "This image looks damaged or incomplete, so it couldn't be read.";
      case "empty_file":
        return "This file is empty.";
      case "unsupported_format":
        return "This image format isn't supported. Try a JPEG or PNG instead.";
      case "file_too_large":
        return `This photo is too large${error.size ? ` (${formatBytes(error.size)})` : ""}. ` +
          `The limit is ${formatBytes(info.max_file_bytes)} per photo.`;
      case "too_many_pixels":
        return "This image has too many pixels to process. Try a smaller version of it.";
      case "request_too_large":
        return "These photos are too large together. Try fewer or smaller photos at once.";
      case "too_many_files":
        return `Too many photos at once. You can search up to ${info.max_files} at a time.`;
      case "over_file_limit":
        return `Not searched: up to ${info.max_files} photos are searched at once. Clear some, then add this one again.`;
      case "no_files":
      case "no_query":
        return "No photo or phrase was received. Please choose a photo or type a few words.";
      case "empty_text":
        return "This phrase is empty. Type a few words to search for.";
      case "invalid_text":
        return "This phrase contains characters that can't be searched (such as control characters).";
      case "text_too_long":
        return `This phrase is too long. The limit is ${info.max_text_chars} characters.`;
      case "too_many_texts":
        return `Too many phrases at once. You can search up to ${info.max_texts} at a time.`;
      case "over_text_limit":
        return `Not searched: up to ${info.max_texts} phrases are searched at once. Clear some and try again.`;
      case "too_many_queries":
        return "Too many photos and phrases at once. Clear some and try again.";
      case "text_search_unavailable":
        return "Search by words is not available with this model. Search with a photo instead.";
      case "invalid_weights":
        return "A weight isn't a usable number. Reload the page and try again.";
      case "zero_query":
        return "The weights cancel each other out, so there is nothing to search for. Change a weight.";
      case "invalid_k":
        return `The number of matches must be between 1 and ${info.max_k}.`;
      case "not_multipart":
      case "malformed_request":
      case "too_many_fields":
        return "The upload wasn't understood by the server. Reload the page and try again.";
      case "overloaded":
        return `The server is busy right now. Please try again ${retry || "in a few seconds"}.`;
      case "unavailable":
        return `The service is restarting. Please try again ${retry || "in a few seconds"}.`;
      case "network_error":
        return "Couldn't reach the server. Check your connection and try again.";
      case "server_error":
      case "internal":
        return "Something went wrong on the server. Please try again.";
      case "not_found":
        return "This image is no longer in the collection (it was removed).";
      case "invalid_filter":
      case "filter_too_large":
        return "The folder filter wasn't accepted. Choose another folder, or all folders.";
      case "unauthorized":
        return "The write token was not accepted. Check it and try again.";
      case "writes_disabled":
        return "Adding and removing images is switched off on this service.";
      case "store_full":
        return "The collection's storage is full, so nothing was stored.";
      case "store_unavailable":
      case "writer_busy":
        return `The collection can't be changed right now. Please try again ${retry || "in a few seconds"}.`;
      case "invalid_key":
        return "The server didn't accept the name for this file.";
      case "missing_result":
        return "The server didn't return a result for this photo. Please try again.";
      default:
        return error.message || "This photo couldn't be searched. Please try again.";
    }
  }

  // Codes whose server message carries specifics worth showing (accepted formats, the
  // image's dimensions, the decoder's complaint); for the others it would repeat our text.
  const DETAIL_CODES = new Set(["unsupported_format", "too_many_pixels", "corrupt_image", "malformed_request"]);

  // The server's own wording, shown small under the friendly text when it adds something.
  function serverDetail(error) {
    if (!error.message || !DETAIL_CODES.has(error.code)) return "";
    return `Details: ${error.message}`;
  }

  function retryAfterText(value) {
    const seconds = parseInt(value, 10);
    if (!Number.isFinite(seconds) || seconds <= 0) return "";
    return seconds === 1 ? "in a second" : `in ${seconds} seconds`;
  }

  // ---------------------------------------------------------------- busy state

  function setBusy(busy, text, isError = false) {
    el.results.setAttribute("aria-busy", String(busy));
    setStatus(busy ? "busy" : isError ? "error" : "idle", text);
  }

  function setStatus(kind, text) {
    el.searchStatus.setAttribute("aria-busy", String(kind === "busy"));
    el.searchStatus.dataset.state = kind;
    el.searchStatus.classList.toggle("is-idle", kind !== "busy");
    el.searchStatus.classList.toggle("is-error", kind === "error");
    el.searchStatus.classList.toggle("is-empty", !text);
    el.searchStatusText.textContent = text;
    el.searchButton.textContent = kind === "busy" ? "Searching…" : "Search again";
  }

  // ---------------------------------------------------------------- lightbox

  function bindLightbox() {
    el.results.addEventListener("click", (event) => {
      const link = event.target.closest("a.match");
      // Modified clicks keep their usual meaning (new tab / window).
      if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
      if (typeof el.lightbox.showModal !== "function") return; // very old browser: follow the link
      event.preventDefault();
      openLightbox(link);
    });
    el.lightboxClose.addEventListener("click", () => el.lightbox.close());
    // A click on the backdrop (the dialog element itself, outside the figure) closes it.
    el.lightbox.addEventListener("click", (event) => {
      if (event.target === el.lightbox) el.lightbox.close();
    });
    el.lightbox.addEventListener("close", () => {
      // Drop the big image so it is not kept in memory (and not re-shown stale).
      el.lightboxImage.removeAttribute("src");
      state.lightboxOpener?.focus();
    });
  }

  function openLightbox(link) {
    state.lightboxOpener = link;
    const name = link.dataset.name;
    const url = link.getAttribute("href"); // the server's `url`, as given
    el.lightboxImage.src = url; // the full-size image, fetched only now that it is shown
    el.lightboxImage.alt = `Full-size image: ${name}`;
    el.lightboxCaption.textContent = link.title;
    el.lightboxOpen.href = url;
    el.lightbox.showModal();
    el.lightboxClose.focus();
  }

  // ---------------------------------------------------------------- helpers

  function strong(text) {
    const node = document.createElement("strong");
    node.textContent = text;
    return node;
  }

  function camel(id) {
    return id.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
  }

  function clamp(value, lo, hi) {
    return Math.min(hi, Math.max(lo, value));
  }

  function basename(path) {
    return String(path || "").split(/[\\/]/).pop();
  }

  function formatWeight(weight) {
    return (weight > 0 ? "+" : weight < 0 ? "−" : "") + String(Math.abs(weight));
  }

  function formatScore(score) {
    return Number.isFinite(score) ? score.toFixed(3) : "–";
  }

  function formatCount(n, one, many) {
    if (n == null) return `? ${many}`;
    return `${Number(n).toLocaleString("en-US")} ${n === 1 ? one : many}`;
  }

  function formatDuration(ms) {
    if (ms < 1000) return `${Math.max(1, Math.round(ms))} ms`;
    return `${(ms / 1000).toFixed(ms < 10000 ? 1 : 0)} s`;
  }

  function formatBytes(bytes) {
    if (!Number.isFinite(bytes)) return "?";
    if (bytes >= 1024 * 1024) return `${+(bytes / (1024 * 1024)).toFixed(1)} MB`;
    if (bytes >= 1024) return `${Math.round(bytes / 1024)} KB`;
    return `${bytes} bytes`;
  }
})();
