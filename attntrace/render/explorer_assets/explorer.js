/* attntrace explorer: reads the data embedded in this page (no network), draws on canvas.
 *
 * Data: #attntrace-meta (JSON) describes layers, steps and diagnoses; each
 * octet-stream script element with data-chunk="L.B.H" holds one head's weights as zlib-compressed,
 * base64-encoded uint8 codes (row-major, queries × keys), inflated here with the
 * native DecompressionStream.  Code 0 = exactly 0, 1..levels = lo + (code-1)·step,
 * then NaN, +inf, -inf (see attntrace/render/explorer.py).
 *
 * Testing surface: window.attntraceExplorer (see the end of this file).
 */
(function () {
  'use strict';

  const WINDOW = 32;          // tokens per column in the token-to-token view
  const ROW = 20;             // px per token row (matches .tok height)
  const MAX_PLOT = 512;       // px of the heatmap's longer side
  const MAX_CELL = 44;        // px of one cell at most (tiny sequences)
  const LABEL_CELL = 12;      // px per cell from which token labels fit on the axes
  const VALUE_CELL = 34;      // px per cell from which values are written in the cells
  const THUMB = 64;           // px of a head thumbnail
  const CACHE_LIMIT = 24;     // decoded heads kept in memory
  const VIRIDIS = [[68, 1, 84], [72, 36, 117], [65, 68, 135], [53, 95, 141], [42, 120, 142], [33, 145, 140],
    [34, 168, 132], [68, 191, 112], [122, 209, 81], [189, 223, 38], [253, 231, 37]];
  const SPECIAL_RGB = { nan: [232, 23, 93], posinf: [255, 159, 28], neginf: [0, 194, 255] };

  const $ = (id) => document.getElementById(id);
  const meta = JSON.parse($('attntrace-meta').textContent);
  const ENC = meta.encoding;
  const chunkElements = new Map();
  document.querySelectorAll('script[data-chunk]').forEach((el) => chunkElements.set(el.dataset.chunk, el));

  const state = {
    layer: 0, batch: 0, head: 0, colour: 'fixed', pool: 'max',
    view: null,               // {r0, nr, c0, nc}: the query rows and key columns shown in the heatmap
    qStart: 0, kStart: 0,     // first token of each column of the token view
    hover: null, pin: null,   // {side: 'q'|'k', pos}
    cursor: null,             // {r, c}: grid cell (block) under the heatmap cursor
    codes: null, headMax: 0, layout: null, drawn: null, serial: 0,
  };

  // ------------------------------------------------------------------ data

  function base64Bytes(text) {
    if (typeof Uint8Array.fromBase64 === 'function') return Uint8Array.fromBase64(text);
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  const cache = new Map();    // "L.B.H" -> Promise<{codes, maxCode}>, in least-recently-used order
  function headData(l, b, h) {
    const key = `${l}.${b}.${h}`;
    let entry = cache.get(key);
    if (entry) { cache.delete(key); cache.set(key, entry); return entry; }
    const L = meta.layers[l];
    const el = chunkElements.get(key);
    if (!el) return Promise.reject(new Error(`attntrace explorer: no data for layer ${l}, batch ${b}, head ${h}`));
    entry = inflate(base64Bytes(el.textContent.trim())).then((codes) => {
      if (codes.length !== L.seq_q * L.seq_k) {
        throw new Error(`attntrace explorer: head ${key} has ${codes.length} values, expected ${L.seq_q}×${L.seq_k}`);
      }
      let maxCode = 0;
      for (let i = 0; i < codes.length; i++) {
        const c = codes[i];
        if (c > maxCode && c <= ENC.levels) maxCode = c;
      }
      return { codes, maxCode };
    });
    cache.set(key, entry);
    while (cache.size > CACHE_LIMIT) cache.delete(cache.keys().next().value);
    return entry;
  }

  const layer = () => meta.layers[state.layer];
  const step = (L) => (L.hi - L.lo) / (ENC.levels - 1);

  function valueTable(L) {
    if (L._values) return L._values;
    const table = new Float64Array(256).fill(NaN);
    for (let c = 1; c <= ENC.levels; c++) table[c] = L.lo + (c - 1) * step(L);
    table[0] = 0;
    table[ENC.posinf] = Infinity;
    table[ENC.neginf] = -Infinity;
    L._values = table;
    return table;
  }

  const isSpecial = (code) => code > ENC.levels;

  function valueText(L, code) {
    if (code === 0) return '0 (exactly)';
    if (code === ENC.nan) return 'NaN';
    if (code === ENC.posinf) return '+inf';
    if (code === ENC.neginf) return '−inf';
    const half = step(L) / 2;
    const digits = Math.min(8, Math.max(3, Math.ceil(-Math.log10(half))));
    const value = valueTable(L)[code];
    const note = (code === 1 && L.lo === 0) ? ' (not exactly 0)' : '';
    return `${value.toFixed(digits)} ± ${half.toPrecision(2)}${note}`;
  }

  function shortValue(L, code) {
    if (code === 0) return '';
    if (isSpecial(code)) return code === ENC.nan ? 'NaN' : (code === ENC.posinf ? '+∞' : '−∞');
    const v = valueTable(L)[code];
    return Math.abs(v) < 10 ? v.toFixed(2) : v.toPrecision(2);
  }

  // Labels as text a reader can trust: spaces at either end, newlines and tabs made visible.
  function tokenLabel(text) {
    if (text === '') return '⟨empty⟩';
    return text.replace(/\n/g, '⏎').replace(/\t/g, '⇥').replace(/^ +| +$/g, (run) => '␣'.repeat(run.length));
  }

  const queryTokens = () => layer().query_tokens[state.batch];
  const keyTokens = () => layer().key_tokens[state.batch];
  const quoted = (label) => `«${tokenLabel(label)}»`;

  // ---------------------------------------------------------------- colour

  function cssColour(name) {
    const text = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    const hex = /^#([0-9a-f]{6})$/i.exec(text);
    if (!hex) return [128, 128, 128];
    const n = parseInt(hex[1], 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  function viridis(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f].map(Math.round);
  }

  function specialColour(code) {
    if (code === ENC.nan) return SPECIAL_RGB.nan;
    if (code === ENC.posinf) return SPECIAL_RGB.posinf;
    if (code === ENC.neginf) return SPECIAL_RGB.neginf;
    return null;
  }

  // The colour scale: the layer's fixed range, or 0 (lo) to this head's max.
  function scaleTop(L) {
    return state.colour === 'head' ? Math.max(2, state.headMax) : ENC.levels;
  }

  function codeColours(L, top) {
    const table = new Uint8ClampedArray(256 * 4);
    const zero = cssColour('--zero');
    for (let c = 0; c < 256; c++) {
      const rgb = c === 0 ? zero : (specialColour(c) || viridis((c - 1) / (top - 1)));
      table.set([rgb[0], rgb[1], rgb[2], 255], c * 4);
    }
    return table;
  }

  // ----------------------------------------------------------- heatmap layout

  function fitView() {
    const L = layer();
    state.view = { r0: 0, nr: L.seq_q, c0: 0, nc: L.seq_k };
  }

  function computeLayout() {
    const v = state.view;
    const width = $('heatwrap').clientWidth || 640;
    const attempt = (left, top) => {
      const avail = Math.max(96, Math.min(MAX_PLOT, width - left - 16));
      const s = Math.min(avail / v.nr, avail / v.nc);
      const f = s >= 1 ? 1 : Math.ceil(1 / s);
      const cell = s >= 1 ? Math.min(Math.floor(s), MAX_CELL) : 1;
      const gr = Math.ceil(v.nr / f), gc = Math.ceil(v.nc / f);
      return { f, cell, gr, gc, left, top, w: gc * cell, h: gr * cell, labels: cell >= LABEL_CELL };
    };
    const labelled = attempt(132, 104);
    return labelled.labels ? labelled : attempt(64, 40);
  }

  // Grid cell (block) -> the token ranges it covers.
  function blockRange(lay, r, c) {
    const v = state.view;
    const q0 = v.r0 + r * lay.f, k0 = v.c0 + c * lay.f;
    return { q0, q1: Math.min(q0 + lay.f, v.r0 + v.nr) - 1, k0, k1: Math.min(k0 + lay.f, v.c0 + v.nc) - 1 };
  }

  // The cell in a block that the readout reports: its largest value (NaN/inf first, as drawn).
  function blockSummary(lay, r, c) {
    const L = layer(), K = L.seq_k, codes = state.codes, values = valueTable(L);
    const b = blockRange(lay, r, c);
    let best = -1, bq = b.q0, bk = b.k0, sum = 0, count = 0, nonFinite = 0;
    for (let q = b.q0; q <= b.q1; q++) {
      for (let k = b.k0; k <= b.k1; k++) {
        const code = codes[q * K + k];
        if (code > best) { best = code; bq = q; bk = k; }
        if (isSpecial(code)) nonFinite++; else sum += values[code];
        count++;
      }
    }
    return { ...b, q: bq, k: bk, code: best, mean: nonFinite ? NaN : sum / count, nonFinite, count };
  }

  // ------------------------------------------------------------- heatmap draw

  const base = document.createElement('canvas');      // heatmap without the cursor
  const pixels = document.createElement('canvas');    // one pixel per grid cell

  function gridImage(lay) {
    const L = layer(), K = L.seq_k, v = state.view, codes = state.codes, f = lay.f;
    const top = scaleTop(L), colours = codeColours(L, top), values = valueTable(L);
    const image = new ImageData(lay.gc, lay.gr);
    const out = image.data;
    const acc = state.pool === 'mean' && f > 1 ? new Float64Array(lay.gc) : new Uint8Array(lay.gc);
    const worst = new Uint8Array(lay.gc);          // largest special code per block (mean pooling)
    const nonZero = new Uint8Array(lay.gc);        // a block of tiny weights is not "exactly 0"
    const scale = (ENC.levels - 1) / (top - 1) / (L.hi - L.lo);
    const zero = cssColour('--zero');
    for (let br = 0; br < lay.gr; br++) {
      acc.fill(0); worst.fill(0); nonZero.fill(0);
      const rFirst = v.r0 + br * f, rEnd = Math.min(rFirst + f, v.r0 + v.nr);
      for (let r = rFirst; r < rEnd; r++) {
        let i = r * K + v.c0;
        for (let bc = 0; bc < lay.gc; bc++) {
          const cEnd = Math.min((bc + 1) * f, v.nc);
          let m = acc[bc];
          if (acc instanceof Uint8Array) {
            for (let c = bc * f; c < cEnd; c++, i++) { if (codes[i] > m) m = codes[i]; }
          } else {
            for (let c = bc * f; c < cEnd; c++, i++) {
              const code = codes[i];
              if (isSpecial(code)) { if (code > worst[bc]) worst[bc] = code; } else m += values[code];
              if (code) nonZero[bc] = 1;
            }
          }
          acc[bc] = m;
        }
      }
      for (let bc = 0; bc < lay.gc; bc++) {
        const o = (br * lay.gc + bc) * 4;
        if (acc instanceof Uint8Array) {
          out.set(colours.subarray(acc[bc] * 4, acc[bc] * 4 + 4), o);
        } else {
          const n = (rEnd - rFirst) * (Math.min((bc + 1) * f, v.nc) - bc * f);
          const mean = acc[bc] / n;
          const rgb = worst[bc] ? specialColour(worst[bc]) : (!nonZero[bc] ? zero : viridis((mean - L.lo) * scale));
          out.set([rgb[0], rgb[1], rgb[2], 255], o);
        }
      }
    }
    return image;
  }

  function niceStep(pxPerToken, minGap) {
    const raw = minGap / pxPerToken;
    const p = Math.pow(10, Math.floor(Math.log10(Math.max(1, raw))));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return Math.max(1, m * p);
    return 10 * p;
  }

  function fitText(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    let lo = 0, hi = text.length;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (ctx.measureText(text.slice(0, mid) + '…').width <= width) lo = mid; else hi = mid - 1;
    }
    return text.slice(0, lo) + '…';
  }

  function drawAxes(ctx, lay) {
    const v = state.view, fg = `rgb(${cssColour('--fg')})`, muted = `rgb(${cssColour('--muted')})`;
    ctx.font = '11px ui-monospace, "DejaVu Sans Mono", monospace';
    ctx.fillStyle = fg;
    ctx.strokeStyle = muted;
    ctx.lineWidth = 1;
    if (lay.labels) {                       // every token labelled: "pos label"
      const q = queryTokens(), k = keyTokens();
      ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
      for (let r = 0; r < v.nr; r++) {
        const pos = v.r0 + r;
        ctx.fillText(fitText(ctx, `${tokenLabel(q[pos])} ${pos}`, lay.left - 8), lay.left - 5, lay.top + (r + 0.5) * lay.cell);
      }
      ctx.textAlign = 'left';
      for (let c = 0; c < v.nc; c++) {
        const pos = v.c0 + c;
        ctx.save();
        ctx.translate(lay.left + (c + 0.5) * lay.cell, lay.top - 5);
        ctx.rotate(-Math.PI / 2);
        ctx.fillText(fitText(ctx, `${pos} ${tokenLabel(k[pos])}`, lay.top - 12), 0, 0);
        ctx.restore();
      }
    } else {                                // ticks at round positions, plus both ends
      const pxPerToken = lay.cell / lay.f;
      const rowStep = niceStep(pxPerToken, 28), colStep = niceStep(pxPerToken, 44);
      ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
      const rows = ticks(v.r0, v.nr, rowStep);
      for (const pos of rows) {
        const y = lay.top + (pos - v.r0 + 0.5) * pxPerToken;
        ctx.fillText(String(pos), lay.left - 6, y);
        ctx.beginPath(); ctx.moveTo(lay.left - 4, y); ctx.lineTo(lay.left, y); ctx.stroke();
      }
      ctx.textAlign = 'center'; ctx.textBaseline = 'bottom';
      for (const pos of ticks(v.c0, v.nc, colStep)) {
        const x = lay.left + (pos - v.c0 + 0.5) * pxPerToken;
        ctx.fillText(String(pos), x, lay.top - 6);
        ctx.beginPath(); ctx.moveTo(x, lay.top - 4); ctx.lineTo(x, lay.top); ctx.stroke();
      }
    }
    ctx.fillStyle = muted;
    ctx.textAlign = 'left'; ctx.textBaseline = 'top';
    ctx.fillText(`keys ${v.c0}–${v.c0 + v.nc - 1} →`, lay.left, lay.top + lay.h + 6);
    ctx.save();
    ctx.translate(12, lay.top);
    ctx.rotate(Math.PI / 2);
    ctx.textBaseline = 'bottom';
    ctx.fillText(`queries ${v.r0}–${v.r0 + v.nr - 1} →`, 0, 0);
    ctx.restore();
  }

  // Round positions inside [start, start+n) plus both ends; round ones too close to an end are dropped.
  function ticks(start, n, every) {
    const last = start + n - 1, out = [start];
    for (let p = Math.ceil(start / every) * every; p <= last; p += every) {
      if (p - start >= every / 2 && last - p >= every / 2) out.push(p);
    }
    if (last !== start) out.push(last);
    return out;
  }

  function drawValues(ctx, lay) {
    const L = layer(), K = L.seq_k, v = state.view, codes = state.codes, top = scaleTop(L);
    ctx.font = '10px ui-monospace, "DejaVu Sans Mono", monospace';
    ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
    for (let r = 0; r < v.nr; r++) {
      for (let c = 0; c < v.nc; c++) {
        const code = codes[(v.r0 + r) * K + v.c0 + c];
        if (code === 0 || shortValue(L, code) === '0.00') continue;    // blank beats a wall of 0.00
        const rgb = specialColour(code) || viridis((code - 1) / (top - 1));
        const luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2];
        ctx.fillStyle = luminance > 140 ? '#111' : '#f4f4f4';
        ctx.fillText(shortValue(L, code), lay.left + (c + 0.5) * lay.cell, lay.top + (r + 0.5) * lay.cell);
      }
    }
  }

  function drawHeat() {
    const lay = computeLayout();
    state.layout = lay;
    const dpr = window.devicePixelRatio || 1;
    const cssW = lay.left + lay.w + 16, cssH = lay.top + lay.h + 26;
    for (const c of [base, $('heat')]) { c.width = Math.round(cssW * dpr); c.height = Math.round(cssH * dpr); }
    const canvas = $('heat');
    canvas.style.width = `${cssW}px`; canvas.style.height = `${cssH}px`;
    pixels.width = lay.gc; pixels.height = lay.gr;
    pixels.getContext('2d').putImageData(gridImage(lay), 0, 0);
    const ctx = base.getContext('2d', { willReadFrequently: true });
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(pixels, lay.left, lay.top, lay.w, lay.h);
    if (lay.cell >= VALUE_CELL) drawValues(ctx, lay);
    drawAxes(ctx, lay);
    state.drawn = `${state.layer}.${state.batch}.${state.head}`;
    document.documentElement.dataset.drawn = state.drawn;     // tests wait on this (no eval under the CSP)
    drawCursor();
    describeHeat(lay);
  }

  function drawCursor() {
    const canvas = $('heat'), ctx = canvas.getContext('2d', { willReadFrequently: true });
    const lay = state.layout;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(base, 0, 0);
    if (!state.cursor) return;
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const x = lay.left + state.cursor.c * lay.cell, y = lay.top + state.cursor.r * lay.cell;
    const pad = lay.cell < 6 ? 3 : 0;      // a visible box even when one cell is one pixel
    ctx.lineWidth = 2;
    ctx.strokeStyle = '#ffffff';
    ctx.strokeRect(x - pad - 1, y - pad - 1, lay.cell + 2 * pad + 2, lay.cell + 2 * pad + 2);
    ctx.strokeStyle = '#000000';
    ctx.lineWidth = 1;
    ctx.strokeRect(x - pad - 2.5, y - pad - 2.5, lay.cell + 2 * pad + 5, lay.cell + 2 * pad + 5);
  }

  function describeHeat(lay) {
    const L = layer(), v = state.view;
    const whole = v.nr === L.seq_q && v.nc === L.seq_k;
    const range = `queries <b>${v.r0}–${v.r0 + v.nr - 1}</b> of ${L.seq_q} × keys <b>${v.c0}–${v.c0 + v.nc - 1}</b> of ${L.seq_k}`;
    const how = lay.f > 1
      ? `<b>pooled</b>: 1 px = ${lay.f}×${lay.f} tokens (block ${state.pool}); the readout names the largest cell of a block. Zoom in (scroll, +) to see single cells.`
      : `every cell shown (1 cell = ${lay.cell} px)${whole ? '' : '; scroll or − to zoom out, drag to pan'}.`;
    $('heat-caption').innerHTML = `${L.name} · head ${state.head}${L.batch > 1 ? ` · batch item ${state.batch}` : ''} — ${range} — ${how}`;
    $('pool-label').hidden = lay.f === 1;
    legend(L);
  }

  function legend(L) {
    const top = scaleTop(L), values = valueTable(L);
    const stops = VIRIDIS.map((rgb, i) => `rgb(${rgb}) ${(100 * i / (VIRIDIS.length - 1)).toFixed(0)}%`).join(', ');
    const lo = L.lo === 0 ? '0' : L.lo.toPrecision(3);
    const hi = values[top].toPrecision(3);
    const topNote = state.colour === 'head' ? ' (this head\'s max)' : '';
    const swatch = (rgb, text) => `<span><span class="sw" style="background: rgb(${rgb})"></span>${text}</span>`;
    let html = `<span>${lo}</span><span class="bar" style="background: linear-gradient(to right, ${stops})"></span><span>${hi}${topNote}</span>`;
    html += swatch(cssColour('--zero'), 'exactly 0');
    if (L.nan) html += swatch(SPECIAL_RGB.nan, `NaN (${L.nan} in layer)`);
    if (L.posinf) html += swatch(SPECIAL_RGB.posinf, `+inf (${L.posinf})`);
    if (L.neginf) html += swatch(SPECIAL_RGB.neginf, `−inf (${L.neginf})`);
    $('legend').innerHTML = html;
  }

  // CSS px inside the canvas -> grid cell, or null outside the plot.
  function gridAt(x, y) {
    const lay = state.layout;
    if (!lay) return null;
    const c = Math.floor((x - lay.left) / lay.cell), r = Math.floor((y - lay.top) / lay.cell);
    if (r < 0 || c < 0 || r >= lay.gr || c >= lay.gc) return null;
    return { r, c };
  }

  function cellInfo(r, c) {
    const lay = state.layout, L = layer(), s = blockSummary(lay, r, c);
    const value = valueTable(L)[s.code];
    return { q: s.q, k: s.k, value, code: s.code, text: valueText(L, s.code), pooled: lay.f,
      q0: s.q0, q1: s.q1, k0: s.k0, k1: s.k1, mean: s.mean, queryToken: queryTokens()[s.q], keyToken: keyTokens()[s.k] };
  }

  function updateReadout() {
    const out = $('readout');
    if (!state.cursor) { out.textContent = 'Move the cursor over the heatmap to read a cell.'; return; }
    const info = cellInfo(state.cursor.r, state.cursor.c);
    const pair = `query ${info.q} ${quoted(info.queryToken)} → key ${info.k} ${quoted(info.keyToken)}`;
    if (info.pooled === 1) {
      out.textContent = `${pair}: ${info.text}`;
    } else {
      const mean = Number.isNaN(info.mean) ? 'NaN/inf inside' : info.mean.toPrecision(3);
      out.textContent = `block: queries ${info.q0}–${info.q1} × keys ${info.k0}–${info.k1} · largest: ${pair} = ${info.text} · block mean ≈ ${mean}`;
    }
    out.dataset.q = info.q; out.dataset.k = info.k; out.dataset.value = String(info.value);
  }

  // ------------------------------------------------------ heatmap interaction

  function clampView(v) {
    const L = layer();
    v.nr = Math.max(1, Math.min(L.seq_q, Math.round(v.nr)));
    v.nc = Math.max(1, Math.min(L.seq_k, Math.round(v.nc)));
    v.r0 = Math.max(0, Math.min(L.seq_q - v.nr, Math.round(v.r0)));
    v.c0 = Math.max(0, Math.min(L.seq_k - v.nc, Math.round(v.c0)));
    return v;
  }

  function zoom(factor, q, k) {
    const v = state.view, L = layer();
    const minSide = Math.min(8, L.seq_q, L.seq_k);
    let s = factor;
    if (Math.min(v.nr, v.nc) * s < minSide) s = minSide / Math.min(v.nr, v.nc);
    const cq = q === undefined ? v.r0 + v.nr / 2 : q + 0.5, ck = k === undefined ? v.c0 + v.nc / 2 : k + 0.5;
    state.view = clampView({ r0: cq - (cq - v.r0) * s, nr: v.nr * s, c0: ck - (ck - v.c0) * s, nc: v.nc * s });
    state.cursor = null;
    drawHeat();
    updateReadout();
    centreWindows(Math.floor(cq), Math.floor(ck));      // the token view follows to the same place
  }

  function setupHeatEvents() {
    const canvas = $('heat');
    let drag = null;
    const local = (e) => { const box = canvas.getBoundingClientRect(); return [e.clientX - box.left, e.clientY - box.top]; };
    canvas.addEventListener('mousemove', (e) => {
      const [x, y] = local(e);
      if (drag && state.layout) {
        const lay = state.layout, perToken = lay.cell / lay.f;
        const dr = (y - drag.y) / perToken, dc = (x - drag.x) / perToken;
        if (Math.abs(dr) >= 1 || Math.abs(dc) >= 1) {
          drag.moved = true;
          state.view = clampView({ ...drag.view, r0: drag.view.r0 - dr, c0: drag.view.c0 - dc });
          drawHeat();
        }
      }
      const cell = gridAt(x, y);
      if (JSON.stringify(cell) !== JSON.stringify(state.cursor)) {
        state.cursor = cell;
        drawCursor();
        updateReadout();
      }
    });
    canvas.addEventListener('mouseleave', () => { drag = null; state.cursor = null; drawCursor(); updateReadout(); });
    canvas.addEventListener('mousedown', (e) => { const [x, y] = local(e); drag = { x, y, view: { ...state.view }, moved: false }; });
    canvas.addEventListener('mouseup', (e) => {
      const wasDrag = drag && drag.moved;
      drag = null;
      if (wasDrag) return;
      const [x, y] = local(e), cell = gridAt(x, y);
      if (cell) pinCell(cell);
    });
    canvas.addEventListener('dblclick', () => { fitView(); drawHeat(); });
    canvas.addEventListener('wheel', (e) => {
      const [x, y] = local(e), cell = gridAt(x, y);
      if (!cell) return;
      e.preventDefault();
      const info = cellInfo(cell.r, cell.c);
      zoom(e.deltaY < 0 ? 0.5 : 2, info.q, info.k);
    }, { passive: false });
    canvas.addEventListener('keydown', (e) => {
      const lay = state.layout;
      if (!lay) return;
      const cur = state.cursor || { r: 0, c: 0 };
      const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
      if (moves[e.key]) {
        e.preventDefault();
        state.cursor = { r: Math.max(0, Math.min(lay.gr - 1, cur.r + moves[e.key][0])),
          c: Math.max(0, Math.min(lay.gc - 1, cur.c + moves[e.key][1])) };
        drawCursor(); updateReadout();
      } else if (e.key === '+' || e.key === '=' || e.key === '-') {
        e.preventDefault();
        const info = state.cursor ? cellInfo(cur.r, cur.c) : {};
        zoom(e.key === '-' ? 2 : 0.5, info.q, info.k);
      } else if (e.key === '0') {
        e.preventDefault(); fitView(); drawHeat(); updateReadout();
      } else if (e.key === 'Enter' && state.cursor) {
        e.preventDefault(); pinCell(state.cursor);
      }
    });
    $('zoom-in').addEventListener('click', () => zoom(0.5));
    $('zoom-out').addEventListener('click', () => zoom(2));
    $('zoom-fit').addEventListener('click', () => { fitView(); state.cursor = null; drawHeat(); updateReadout(); });
  }

  function pinCell(cell) {
    const info = cellInfo(cell.r, cell.c);
    state.pin = { side: 'q', pos: info.q };
    centreWindows(info.q, info.k);
  }

  // ---------------------------------------------------------- token view

  const windowSize = (n) => Math.min(WINDOW, n);
  const clampStart = (start, n) => Math.max(0, Math.min(n - windowSize(n), start));

  function centreWindows(q, k) {
    const L = layer();
    state.qStart = clampStart(q - (WINDOW >> 1), L.seq_q);
    if (k !== undefined) state.kStart = clampStart(k - (WINDOW >> 1), L.seq_k);
    renderTokens();
  }

  function renderColumn(side) {
    const L = layer();
    const labels = side === 'q' ? queryTokens() : keyTokens();
    const n = side === 'q' ? L.seq_q : L.seq_k, start = side === 'q' ? state.qStart : state.kStart;
    const list = $(side === 'q' ? 'qlist' : 'klist');
    list.textContent = '';
    for (let pos = start; pos < start + windowSize(n); pos++) {
      const el = document.createElement('div');
      el.className = 'tok';
      el.tabIndex = 0;
      el.setAttribute('role', 'listitem');
      el.dataset.side = side; el.dataset.pos = pos;
      el.title = `${side === 'q' ? 'query' : 'key'} ${pos}: ${labels[pos]}`;
      const p = document.createElement('span'); p.className = 'pos'; p.textContent = pos;
      const lab = document.createElement('span'); lab.className = 'lab'; lab.textContent = tokenLabel(labels[pos]);
      if (labels[pos] === '') el.classList.add('special');
      const w = document.createElement('span'); w.className = 'w';
      el.append(p, lab, w);
      list.append(el);
    }
    const end = start + windowSize(n) - 1;
    $(side === 'q' ? 'qrange' : 'krange').textContent =
      `${side === 'q' ? 'queries' : 'keys'} ${start}–${end} of ${n}`;
    for (const button of document.querySelectorAll(`.scroll[data-side="${side}"]`)) {
      button.disabled = button.dataset.dir < 0 ? start === 0 : end === n - 1;
      button.style.visibility = n > WINDOW ? 'visible' : 'hidden';
    }
  }

  function renderTokens() {
    renderColumn('q');
    renderColumn('k');
    highlightTokens();
  }

  const weightAt = (q, k) => valueTable(layer())[state.codes[q * layer().seq_k + k]];
  const codeAt = (q, k) => state.codes[q * layer().seq_k + k];

  function focusToken() { return state.hover || state.pin; }

  function highlightTokens() {
    const L = layer(), focus = focusToken();
    const nq = windowSize(L.seq_q), nk = windowSize(L.seq_k);
    const canvas = $('lines'), dpr = window.devicePixelRatio || 1;
    const width = 140, height = Math.max(nq, nk) * ROW;
    canvas.width = width * dpr; canvas.height = height * dpr;
    canvas.style.height = `${height}px`;
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const accent = cssColour('--accent');
    const line = (q, k, w) => {
      if (!(w > 0)) return;
      ctx.strokeStyle = `rgba(${accent}, ${Math.min(1, w)})`;
      ctx.lineWidth = focus ? 1 + 5 * Math.min(1, w) : 1.5;
      ctx.beginPath();
      ctx.moveTo(0, (q - state.qStart + 0.5) * ROW);
      ctx.lineTo(width, (k - state.kStart + 0.5) * ROW);
      ctx.stroke();
    };
    for (const el of document.querySelectorAll('.tok')) {
      el.classList.toggle('hover', !!state.hover && el.dataset.side === state.hover.side && +el.dataset.pos === state.hover.pos);
      el.classList.toggle('pinned', !!state.pin && el.dataset.side === state.pin.side && +el.dataset.pos === state.pin.pos);
      el.style.background = '';
      el.querySelector('.w').textContent = '';
      delete el.dataset.weight;
    }
    if (!focus) {
      for (let q = state.qStart; q < state.qStart + nq; q++) {
        for (let k = state.kStart; k < state.kStart + nk; k++) line(q, k, weightAt(q, k));
      }
      $('tok-note').textContent = 'Lines: every shown query to every shown key, opacity = weight. Hover a token to see only its lines.';
      return;
    }
    const other = focus.side === 'q' ? 'k' : 'q';
    const targets = document.querySelectorAll(`.tok[data-side="${other}"]`);
    for (const el of targets) {
      const pos = +el.dataset.pos;
      const [q, k] = focus.side === 'q' ? [focus.pos, pos] : [pos, focus.pos];
      const code = codeAt(q, k), w = weightAt(q, k);
      el.dataset.weight = String(w);
      el.dataset.code = String(code);
      el.querySelector('.w').textContent = shortValue(L, code);
      if (w > 0 && Number.isFinite(w)) el.style.background = `rgba(${accent}, ${(0.06 + 0.6 * Math.min(1, w)).toFixed(3)})`;
      if (!isSpecial(code)) line(q, k, w);
    }
    outsideNote(focus);
  }

  // What the window hides: the weight on tokens outside it and the strongest of them.
  function outsideNote(focus) {
    const L = layer(), values = valueTable(L);
    const alongKeys = focus.side === 'q';
    const n = alongKeys ? L.seq_k : L.seq_q;
    const start = alongKeys ? state.kStart : state.qStart, end = start + windowSize(n);
    let before = 0, after = 0, inside = 0, bestPos = -1, best = -Infinity, nonFinite = 0;
    for (let i = 0; i < n; i++) {
      const code = alongKeys ? codeAt(focus.pos, i) : codeAt(i, focus.pos);
      if (isSpecial(code)) { nonFinite++; continue; }
      const w = values[code];
      if (i < start) before += w; else if (i >= end) after += w; else inside += w;
      if ((i < start || i >= end) && w > best) { best = w; bestPos = i; }
    }
    const labels = alongKeys ? keyTokens() : queryTokens();
    const who = alongKeys ? `query ${focus.pos} ${quoted(queryTokens()[focus.pos])}` : `key ${focus.pos} ${quoted(keyTokens()[focus.pos])}`;
    const what = alongKeys ? 'keys' : 'queries';
    const note = $('tok-note');
    note.textContent = '';
    let text = `${who}: the ${what} shown carry ≈${inside.toFixed(2)} of its weight`;
    if (start > 0 || end < n) text += `; outside them ≈${before.toFixed(2)} before and ≈${after.toFixed(2)} after`;
    if (nonFinite) text += `; ${nonFinite} NaN/inf`;
    text += '.';
    note.append(text);
    if (bestPos >= 0 && best > 0) {
      note.append(` Strongest ${alongKeys ? 'key' : 'query'} outside: ${bestPos} ${quoted(labels[bestPos])} (${best.toFixed(3)}) `);
      const show = document.createElement('button');
      show.type = 'button'; show.textContent = 'show';
      show.addEventListener('click', () => {
        state.pin = { ...focus };
        if (alongKeys) state.kStart = clampStart(bestPos - (WINDOW >> 1), n); else state.qStart = clampStart(bestPos - (WINDOW >> 1), n);
        renderTokens();
      });
      note.append(show);
    }
  }

  function setupTokenEvents() {
    const view = $('tokview');
    const tokenOf = (e) => e.target.closest && e.target.closest('.tok');
    view.addEventListener('mouseover', (e) => {
      const el = tokenOf(e);
      if (!el) return;
      const hover = { side: el.dataset.side, pos: +el.dataset.pos };
      if (!state.hover || state.hover.side !== hover.side || state.hover.pos !== hover.pos) { state.hover = hover; highlightTokens(); }
    });
    view.addEventListener('focusin', (e) => { const el = tokenOf(e); if (el) { state.hover = { side: el.dataset.side, pos: +el.dataset.pos }; highlightTokens(); } });
    view.addEventListener('mouseleave', () => { state.hover = null; highlightTokens(); });
    view.addEventListener('focusout', (e) => { if (!view.contains(e.relatedTarget)) { state.hover = null; highlightTokens(); } });
    const toggle = (el) => {
      const pos = +el.dataset.pos, side = el.dataset.side;
      state.pin = state.pin && state.pin.side === side && state.pin.pos === pos ? null : { side, pos };
      highlightTokens();
    };
    view.addEventListener('click', (e) => { const el = tokenOf(e); if (el) toggle(el); });
    view.addEventListener('keydown', (e) => { const el = tokenOf(e); if (el && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); toggle(el); } });
    const scroll = (side, delta) => {
      const L = layer();
      if (side === 'q') state.qStart = clampStart(state.qStart + delta, L.seq_q);
      else state.kStart = clampStart(state.kStart + delta, L.seq_k);
      renderTokens();
    };
    for (const button of document.querySelectorAll('.scroll')) {
      button.addEventListener('click', () => scroll(button.dataset.side, +button.dataset.dir * (WINDOW >> 1)));
    }
    for (const side of ['q', 'k']) {
      $(side === 'q' ? 'qcol' : 'kcol').addEventListener('wheel', (e) => {
        const L = layer();
        if ((side === 'q' ? L.seq_q : L.seq_k) <= WINDOW) return;
        e.preventDefault();
        scroll(side, Math.sign(e.deltaY) * 4);
      }, { passive: false });
    }
  }

  // --------------------------------------------------------------- heads grid

  let thumbSerial = 0;
  function renderHeadGrid() {
    const L = layer(), grid = $('head-grid'), serial = ++thumbSerial;
    grid.textContent = '';
    const flagged = new Map();
    for (const d of meta.diagnoses) {
      if (d.layer === state.layer && d.head !== null) {
        flagged.set(d.head, flagged.get(d.head) === 'error' || d.severity === 'error' ? 'error' : 'warning');
      }
    }
    for (let h = 0; h < L.heads; h++) {
      const button = document.createElement('button');
      button.type = 'button'; button.className = 'head-btn'; button.dataset.head = h;
      button.setAttribute('aria-pressed', String(h === state.head));
      button.setAttribute('aria-label', `head ${h}${flagged.has(h) ? ` (has a ${flagged.get(h)})` : ''}`);
      const canvas = document.createElement('canvas');
      canvas.width = THUMB; canvas.height = THUMB;
      const label = document.createElement('span'); label.textContent = `head ${h}`;
      button.append(canvas, label);
      if (flagged.has(h)) {
        const flag = document.createElement('span');
        flag.className = `flag ${flagged.get(h)}`; flag.textContent = '⚠'; flag.setAttribute('aria-hidden', 'true');
        button.append(flag);
      }
      button.addEventListener('click', () => select(state.layer, h, state.batch));
      grid.append(button);
    }
    const f = Math.max(1, Math.ceil(Math.max(L.seq_q, L.seq_k) / THUMB));
    $('heads-note').textContent = `thumbnails: ${f > 1 ? `block max of ${f}×${f} tokens, ` : ''}each scaled to its own max`;
    // thumbnails after the main view is drawn, one head at a time, abandoned if the layer changes
    (async () => {
      for (let h = 0; h < L.heads; h++) {
        await new Promise((resolve) => setTimeout(resolve, 0));
        if (serial !== thumbSerial) return;
        const { codes, maxCode } = await headData(state.layer, state.batch, h);
        if (serial !== thumbSerial) return;
        drawThumb(grid.children[h].querySelector('canvas'), L, codes, maxCode, f);
      }
      document.documentElement.dataset.thumbs = `${state.layer}.${state.batch}`;    // tests wait on this
    })().catch(fail);
  }

  function drawThumb(canvas, L, codes, maxCode, f) {
    const gr = Math.ceil(L.seq_q / f), gc = Math.ceil(L.seq_k / f);
    const block = new Uint8Array(gr * gc);
    for (let q = 0; q < L.seq_q; q++) {
      const row = ((q / f) | 0) * gc, base = q * L.seq_k;
      for (let k = 0; k < L.seq_k; k++) {
        const b = row + ((k / f) | 0), c = codes[base + k];
        if (c > block[b]) block[b] = c;
      }
    }
    const colours = codeColours(L, Math.max(2, maxCode));
    const image = new ImageData(gc, gr);
    for (let i = 0; i < block.length; i++) image.data.set(colours.subarray(block[i] * 4, block[i] * 4 + 4), i * 4);
    const tmp = document.createElement('canvas');
    tmp.width = gc; tmp.height = gr;
    tmp.getContext('2d').putImageData(image, 0, 0);
    const ctx = canvas.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    const s = THUMB / Math.max(gr, gc);
    ctx.clearRect(0, 0, THUMB, THUMB);
    ctx.drawImage(tmp, 0, 0, gc * s, gr * s);
  }

  // --------------------------------------------------------------- selection

  function fillSelect(el, count, label, selected) {
    el.textContent = '';
    for (let i = 0; i < count; i++) {
      const option = document.createElement('option');
      option.value = i; option.textContent = label(i);
      el.append(option);
    }
    el.value = String(selected);
  }

  async function select(l, h, b) {
    const serial = ++state.serial;
    const changedLayer = l !== state.layer || b !== state.batch || !state.view;
    const L = meta.layers[l];
    if (!L) throw new Error(`attntrace explorer: no layer ${l}`);
    if (!(h >= 0 && h < L.heads)) throw new Error(`attntrace explorer: layer ${l} has no head ${h}`);
    if (!(b >= 0 && b < L.batch)) throw new Error(`attntrace explorer: layer ${l} has no batch item ${b}`);
    const { codes, maxCode } = await headData(l, b, h);
    if (serial !== state.serial) return;       // a later selection won
    const layerChanged = l !== state.layer;
    state.layer = l; state.head = h; state.batch = b;
    state.codes = codes; state.headMax = maxCode;
    if (changedLayer) {
      fitView();
      state.hover = null; state.pin = null; state.cursor = null;
      state.qStart = 0; state.kStart = 0;
    }
    if (state.view.r0 + state.view.nr > L.seq_q || state.view.c0 + state.view.nc > L.seq_k) fitView();
    if (layerChanged || changedLayer) {
      fillSelect($('head-select'), L.heads, (i) => `head ${i}`, h);
      fillSelect($('batch-select'), L.batch, (i) => `item ${i}`, b);
      $('batch-label').hidden = L.batch < 2;
    }
    $('layer-select').value = String(l);
    $('head-select').value = String(h);
    $('batch-select').value = String(b);
    drawHeat();
    updateReadout();
    renderTokens();
    if (changedLayer || !$('head-grid').children.length) renderHeadGrid();
    for (const button of $('head-grid').children) button.setAttribute('aria-pressed', String(+button.dataset.head === h));
    markCurrentSteps();
  }

  // ---------------------------------------------------------- steps, diagnoses

  function renderSteps() {
    const body = document.querySelector('#steps tbody');
    const cell = (text, cls) => { const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; return td; };
    for (const s of meta.steps) {
      const tr = document.createElement('tr');
      tr.dataset.hook = s.hook;
      const dtype = s.true === null ? s.dtype : `${s.dtype} (${s.true} true)`;
      tr.append(cell(s.hook), cell(`(${s.shape.join(', ')})`), cell(s.axes.join(', ')), cell(dtype),
        cell(s.min ?? '—', 'num'), cell(s.max ?? '—', 'num'), cell(s.mean ?? '—', 'num'),
        cell(String(s.nan), s.nan ? 'num bad' : 'num'), cell(String(s.posinf), s.posinf ? 'num bad' : 'num'),
        cell(String(s.neginf), s.neginf ? 'num bad' : 'num'));
      body.append(tr);
    }
    $('step-count').textContent = `${meta.steps.length} step${meta.steps.length === 1 ? '' : 's'} · exact values as given`;
    $('step-filter').addEventListener('input', (e) => {
      const needle = e.target.value.toLowerCase();
      for (const tr of body.children) tr.hidden = !tr.dataset.hook.toLowerCase().includes(needle);
    });
  }

  function markCurrentSteps() {
    const L = layer();
    for (const tr of document.querySelectorAll('#steps tbody tr')) tr.classList.toggle('current', !!L && tr.dataset.hook.startsWith(L.name));
  }

  function renderDiagnoses() {
    const list = $('diags');
    const counts = {};
    for (const d of meta.diagnoses) counts[d.severity] = (counts[d.severity] || 0) + 1;
    $('diag-count').textContent = meta.diagnoses.length
      ? Object.entries(counts).map(([k, n]) => `${n} ${k}${n === 1 ? '' : 's'}`).join(' · ') : 'none';
    if (!meta.diagnoses.length) {
      const li = document.createElement('li'); li.className = 'empty'; li.textContent = 'No diagnoses.';
      list.append(li);
      return;
    }
    for (const d of meta.diagnoses) {
      const li = document.createElement('li');
      li.className = ['error', 'warning'].includes(d.severity) ? d.severity : 'info';
      const badge = document.createElement('span'); badge.className = 'badge'; badge.textContent = d.code;
      const body = document.createElement('div');
      const message = document.createElement('div'); message.textContent = d.message;
      body.append(message);
      const where = [d.hook, d.layer !== null ? meta.layers[d.layer].name : null, d.head !== null ? `head ${d.head}` : null].filter((x) => x);
      if (where.length) { const w = document.createElement('div'); w.className = 'where'; w.textContent = `${d.severity} · ${where.join(' · ')}`; body.append(w); }
      li.append(badge, body);
      if (d.hint) { const hint = document.createElement('div'); hint.className = 'hint'; hint.textContent = `hint: ${d.hint}`; li.append(hint); }
      if (d.layer !== null && meta.layers[d.layer] && d.head !== null && d.head < meta.layers[d.layer].heads) {
        li.classList.add('linked'); li.tabIndex = 0; li.title = 'show this head';
        const go = () => select(d.layer, d.head, 0).catch(fail);
        li.addEventListener('click', go);
        li.addEventListener('keydown', (e) => { if (e.key === 'Enter') go(); });
      }
      list.append(li);
    }
  }

  // ------------------------------------------------------------------- setup

  function fail(error) {
    console.error(error);
    const el = $('summary');
    el.textContent = `The explorer could not start: ${error.message}`;
    el.className = 'sub fatal';
  }

  function summary() {
    const heads = meta.layers.reduce((n, L) => n + L.heads, 0);
    const longest = meta.layers.reduce((n, L) => Math.max(n, L.seq_q, L.seq_k), 0);
    const parts = [`${meta.layers.length} layer${meta.layers.length === 1 ? '' : 's'}`, `${heads} heads`,
      `up to ${longest} tokens`, `${meta.steps.length} steps`, `${meta.diagnoses.length} diagnoses`];
    $('summary').textContent = parts.join(' · ');
  }

  function setupControls() {
    fillSelect($('layer-select'), meta.layers.length, (i) => {
      const L = meta.layers[i];
      return `${i} · ${L.name} (${L.heads} head${L.heads === 1 ? '' : 's'}, ${L.seq_q}×${L.seq_k})`;
    }, 0);
    $('layer-select').addEventListener('change', (e) => select(+e.target.value, 0, 0).catch(fail));
    $('head-select').addEventListener('change', (e) => select(state.layer, +e.target.value, state.batch).catch(fail));
    $('batch-select').addEventListener('change', (e) => select(state.layer, state.head, +e.target.value).catch(fail));
    $('colour-select').addEventListener('change', (e) => { state.colour = e.target.value; drawHeat(); });
    $('pool-select').addEventListener('change', (e) => { state.pool = e.target.value; drawHeat(); updateReadout(); });
    for (const button of document.querySelectorAll('[data-theme-choice]')) {
      button.addEventListener('click', () => setTheme(button.dataset.themeChoice));
    }
    window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', redraw);
    let resizeTimer = 0;
    window.addEventListener('resize', () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(redraw, 120); });
  }

  function setTheme(choice) {
    if (choice === 'auto') delete document.documentElement.dataset.theme; else document.documentElement.dataset.theme = choice;
    for (const b of document.querySelectorAll('[data-theme-choice]')) b.setAttribute('aria-pressed', String(b.dataset.themeChoice === choice));
    redraw();
  }

  function redraw() {
    if (!state.codes) return;
    drawHeat(); highlightTokens(); renderHeadGrid();
  }

  async function start() {
    summary();
    renderSteps();
    renderDiagnoses();
    if (!meta.layers.length) {
      for (const id of ['layer-select', 'head-select', 'colour-select']) $(id).disabled = true;
      $('tok-note').textContent = 'No attention pattern in this trace.';
      $('readout').textContent = 'No attention pattern in this trace.';
      $('pool-label').hidden = true;
      return;
    }
    setupControls();
    setupHeatEvents();
    setupTokenEvents();
    await select(0, 0, 0);
  }

  const ready = start().then(() => { document.documentElement.dataset.ready = 'true'; });
  ready.catch(fail);

  // Testing surface: deterministic hooks for browser tests (coordinates are CSS px inside #heat).
  window.attntraceExplorer = {
    ready,
    select: (l, h, b = 0) => select(l, h, b),
    state: () => ({ layer: state.layer, head: state.head, batch: state.batch, drawn: state.drawn,
      view: { ...state.view }, pooled: state.layout ? state.layout.f : null, cell: state.layout ? state.layout.cell : null,
      colour: state.colour, pool: state.pool, hover: state.hover, pin: state.pin, qStart: state.qStart, kStart: state.kStart }),
    cellAt: (x, y) => { const g = gridAt(x, y); return g ? cellInfo(g.r, g.c) : null; },
    cellCenter: (q, k) => {
      const lay = state.layout, v = state.view;
      if (q < v.r0 || q >= v.r0 + v.nr || k < v.c0 || k >= v.c0 + v.nc) return null;
      return { x: lay.left + (Math.floor((k - v.c0) / lay.f) + 0.5) * lay.cell, y: lay.top + (Math.floor((q - v.r0) / lay.f) + 0.5) * lay.cell };
    },
    pixelAt: (q, k) => {         // near the cell's top-left corner, clear of a value written in the cell
      const p = window.attntraceExplorer.cellCenter(q, k), dpr = window.devicePixelRatio || 1, lay = state.layout;
      if (!p) return null;
      const inset = lay.cell / 2 - Math.floor(lay.cell * 0.15);
      return Array.from(base.getContext('2d', { willReadFrequently: true })
        .getImageData(Math.floor((p.x - inset) * dpr), Math.floor((p.y - inset) * dpr), 1, 1).data);
    },
    value: (q, k) => weightAt(q, k),
    zoom: (factor, q, k) => zoom(factor, q, k),
    fit: () => { fitView(); drawHeat(); },
    setColour: (mode) => { state.colour = mode; $('colour-select').value = mode; drawHeat(); },
    setPool: (mode) => { state.pool = mode; $('pool-select').value = mode; drawHeat(); },
    colourOf: (t) => viridis(t),
  };
})();
