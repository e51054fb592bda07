// report.html behaviour; inlined by html.py. No libraries, no network.
// The body's data-report-status goes "loading" -> "ready" only when every step below ran
// without an error, and to "error" (with the message in #js-errors) otherwise: tests and
// readers can tell a fully working page from a half-broken one. data-ready-ms is the time from
// the start of navigation to "ready".
(function () {
  "use strict";
  var body = document.body;
  window.addEventListener("error", function (event) {
    body.setAttribute("data-report-status", "error");
    document.getElementById("js-errors").textContent += "script error: " + event.message + "\n";
  });
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  // ---- numbers as svg.fmt writes them: integers with separators, floats with 3 significant
  // digits (Python's "g" format: an exponent of two digits or more outside [1e-3, 1e5)).
  function fmt(value, integer) {
    if (value === null || value === undefined || !isFinite(value)) return "n/a";
    if (integer) return Math.round(value).toLocaleString("en-US");
    if (value === 0) return "0";
    var size = Math.abs(value);
    if (size >= 1e-3 && size < 1e5) {
      var exponent = Math.floor(Math.log10(Number(size.toPrecision(3))));
      if (exponent < 3) return trimZeros(value.toFixed(Math.max(0, 2 - exponent)));
      return exponential(value, 3);
    }
    return exponential(value, 2);
  }
  function trimZeros(text) { return text.indexOf(".") < 0 ? text : text.replace(/\.?0+$/, ""); }
  function exponential(value, keep) {
    var parts = value.toExponential(2).split("e");
    var mantissa = keep === 3 ? trimZeros(parts[0]) : parts[0];
    var power = parseInt(parts[1], 10);
    return mantissa + "e" + (power < 0 ? "-" : "+") + (Math.abs(power) < 10 ? "0" : "") + Math.abs(power);
  }
  function escapeHtml(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  // ---- server-rendered tables: cells carry their sort key in data-v (numbers, or text); empty
  // data-v sorts last.
  function sortKey(cell, numeric) {
    var raw = cell.getAttribute("data-v");
    if (raw === null) raw = cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    var value = parseFloat(raw);
    return isNaN(value) ? null : value;
  }

  function compare(x, y, ascending) {
    if (x === y) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * (ascending ? 1 : -1);
  }

  function markSorted(table, header, ascending) {
    each(table.tHead.rows[0].cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  function sortTable(table, column, header) {
    var numeric = header.getAttribute("data-type") === "num";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      return compare(sortKey(a.cells[column], numeric), sortKey(b.cells[column], numeric), ascending);
    });
    rows.forEach(function (row) { tbody.appendChild(row); });
    markSorted(table, header, ascending);
  }

  each(document.querySelectorAll("table.sortable:not(.paged)"), function (table) {
    each(table.tHead.rows[0].cells, function (header, column) {
      header.title = "click to sort";
      header.addEventListener("click", function () { sortTable(table, column, header); });
    });
  });

  // ---- contexts: snippets rendered once by html.py; a feature's top token is shaded by its
  // activation against the feature's largest.
  var contexts = JSON.parse(document.getElementById("contexts").textContent);
  function contextHtml(token, value, scale) {
    var snippet = contexts[token];
    if (snippet === undefined) return "token #" + token;
    var share = scale ? Math.min(1, Math.max(0, value / scale)) : 1;
    var tip = "activation " + fmt(value) + ": " + Math.round(100 * share) + "% of the feature's largest (" +
      fmt(scale) + ")";
    return snippet.replace("<mark>", '<mark class="act" style="--act:' + share.toFixed(2) + '" title="' +
      escapeHtml(tip) + '">');
  }

  // ---- Neuronpedia quick lists (neuronpedia.quick_list_url's format): the feature table's page
  // and every link html.py writes with data-np, data-name and data-features.
  function quickListUrl(np, name, ids) {
    var parts = np.split("/");
    var listed = ids.map(function (id) { return { modelId: parts[0], layer: parts[1], index: String(id) }; });
    return "https://www.neuronpedia.org/quick-list/?name=" + encodeURIComponent(name) + "&features=" +
      encodeURIComponent(JSON.stringify(listed));
  }
  each(document.querySelectorAll("a.quick-list[data-features]"), function (link) {
    link.href = quickListUrl(link.getAttribute("data-np"), link.getAttribute("data-name"),
                             link.getAttribute("data-features").split(" "));
  });

  // ---- feature tables: rows from the layer's JSON (html.py _feature_data), one page in the DOM.
  var ROW = { id: 0, tier: 1, conditions: 2, gain: 3, reason: 12, maxCode: 13, checks: 14, top: 15, sign: 16 };
  var TIERS = ["certified", "violated", "satisfied"];
  var TIER_FILTERS = {
    descent: function (tier) { return tier < 2; },
    certified: function (tier) { return tier === 0; },
    violated: function (tier) { return tier === 1; },
    satisfied: function (tier) { return tier === 2; },
    all: function () { return true; }
  };
  var QUICK_LIST = 25;  // html.py MAX_QUICK_LIST

  function parseIds(text) {
    // "12, 40-60" -> [[12, 12], [40, 60]]; null when the text is not a list of ids and ranges
    var ranges = [], ok = true;
    text.split(/[\s,;]+/).forEach(function (part) {
      if (!part) return;
      var match = /^(\d+)(?:-(\d+))?$/.exec(part);
      if (!match) { ok = false; return; }
      var lo = parseInt(match[1], 10), hi = match[2] === undefined ? lo : parseInt(match[2], 10);
      ranges.push([Math.min(lo, hi), Math.max(lo, hi)]);
    });
    return ok ? ranges : null;
  }

  function certificateText(check, reasons) {
    // as html.py _certificate_text; a check that is not certified comes as its verdict only
    if (check.length === 3) {
      return check[0] + " " + TIERS[check[1]] + (check[2] >= 0 ? ": " + reasons[check[2]] : "") +
        " (its step and audit-token numbers: tables/<hook>/features.parquet)";
    }
    var held = check[5] === null ? "no held-out tokens" :
      fmt(check[5]) + " ± " + fmt(check[6]) + " on " + fmt(check[9], true) + " held-out (p " + fmt(check[7]) +
      ", " + fmt(check[10], true) + " changed)";
    var reason = check[11] >= 0 ? "; " + reasons[check[11]] : "";
    return check[0] + " step " + fmt(check[2]) + ": predicted " + fmt(check[3]) + ", measured " + fmt(check[4]) +
      " on " + fmt(check[8], true) + " audit, " + held + reason;
  }

  // A table's rows are parsed and its first page drawn when it is first needed (near the
  // viewport, any of its controls used, or the browser idle after load): at 12 layers x 24,576
  // features parsing every layer before the page shows would double its load time.
  function FeatureTable(table, source, controls) {
    var data = null, kinds = [];
    each(table.tHead.rows[0].cells, function (th) { kinds.push(th.getAttribute("data-kind")); });
    var np = table.getAttribute("data-np");
    var state = { tier: "descent", condition: "", ids: [], bad: false, column: -1, ascending: true, page: 0,
                  size: parseInt(controls.querySelector(".page-size").value, 10) };
    var view = [], hidden = 0;
    var status = controls.querySelector(".page-status"), quickList = controls.querySelector(".page-quick-list");

    function key(row, column) {
      var kind = kinds[column], value = row[column];
      if (kind === "text") {
        if (column === ROW.reason) return value >= 0 ? data.reasons[value].toLowerCase() : null;
        return value ? value.toLowerCase() : null;
      }
      return value === null ? null : value;
    }

    function matchesIds(row) {
      if (!state.ids.length) return true;
      for (var k = 0; k < state.ids.length; k++) {
        if (row[ROW.id] >= state.ids[k][0] && row[ROW.id] <= state.ids[k][1]) return true;
      }
      return false;
    }

    function filter() {
      var tierOk = TIER_FILTERS[state.tier], condition = state.condition;
      view = [];
      hidden = 0;
      data.rows.forEach(function (row) {
        if (state.bad || !matchesIds(row)) return;
        var conditionOk = !condition || (" " + row[ROW.conditions] + " ").indexOf(" " + condition + " ") >= 0;
        if (tierOk(row[ROW.tier]) && conditionOk) view.push(row);
        else if (state.ids.length) hidden += 1;
      });
      if (state.column >= 0) {
        var column = state.column, ascending = state.ascending;
        var keyed = view.map(function (row, rank) { return [key(row, column), rank, row]; });
        keyed.sort(function (a, b) { return compare(a[0], b[0], ascending) || a[1] - b[1]; });
        view = keyed.map(function (item) { return item[2]; });
      }
    }

    function cell(row, column) {
      var kind = kinds[column], value = row[column];
      if (kind === "id") {  // a signed SAE's row names its sign: "12+", "12−" (the dashboard is the latent's)
        var label = String(value) + (row[ROW.sign] ? (row[ROW.sign] === "-" ? "\u2212" : "+") : "");
        var shown = np ? '<a href="https://www.neuronpedia.org/' + np.split("/").map(encodeURIComponent).join("/") +
          "/" + value + '" target="_blank" rel="noopener">' + label + "</a>" : label;
        return '<td data-v="' + value + '">' + shown + "</td>";
      }
      if (kind === "tier") return '<td class="text"><span class="badge ' + TIERS[value] + '">' + TIERS[value] + "</span></td>";
      if (kind === "text") {
        var text = column === ROW.reason ? (value >= 0 ? data.reasons[value] : "") : value;
        return '<td class="text">' + escapeHtml(text) + "</td>";
      }
      if (kind === "gain" && row[ROW.checks].length) {
        var tip = row[ROW.checks].map(function (check) { return certificateText(check, data.reasons); }).join("\n");
        return '<td><abbr title="' + escapeHtml(tip) + '">' + fmt(value) + "</abbr></td>";
      }
      return "<td>" + fmt(value, kind === "int") + "</td>";
    }

    function render() {
      var pages = Math.max(1, Math.ceil(view.length / state.size));
      state.page = Math.min(Math.max(0, state.page), pages - 1);
      var first = state.page * state.size, shown = view.slice(first, first + state.size);
      table.tBodies[0].innerHTML = shown.map(function (row, k) {
        var cells = "";
        for (var column = 0; column < kinds.length; column++) cells += cell(row, column);
        return '<tr data-feature="' + row[ROW.id] + '" data-row="' + (first + k) + '">' + cells + "</tr>";
      }).join("");
      var text = state.bad ? "not a list of ids: write e.g. 12, 40-60" :
        view.length ? (first + 1).toLocaleString("en-US") + "–" + (first + shown.length).toLocaleString("en-US") +
          " of " + view.length.toLocaleString("en-US") : "no feature matches";
      if (hidden) text += "; " + hidden.toLocaleString("en-US") + " matching id(s) hidden by the tier or condition filter";
      status.textContent = " " + text + " (" + data.rows.length.toLocaleString("en-US") + " features) ";
      controls.querySelector(".page-prev").disabled = controls.querySelector(".page-first").disabled = state.page === 0;
      controls.querySelector(".page-next").disabled = controls.querySelector(".page-last").disabled =
        state.page >= pages - 1;
      if (np && shown.length) {
        var listed = shown.slice(0, QUICK_LIST).map(function (row) { return row[ROW.id]; });
        quickList.href = quickListUrl(np, table.closest("section").querySelector("h2").textContent + ": features", listed);
        quickList.textContent = "first " + listed.length + " of this page on Neuronpedia";
        quickList.hidden = false;
      } else {
        quickList.hidden = true;
      }
    }

    function details(tr) {
      var next = tr.nextElementSibling;
      if (next && next.classList.contains("detail")) { next.remove(); return; }
      // the row's place in the view drawn (a signed SAE has two rows per feature id)
      var row = view[parseInt(tr.getAttribute("data-row"), 10)];
      var checks = row[ROW.checks].map(function (check) {
        return '<li><span class="badge ' + TIERS[check[1]] + '">' + TIERS[check[1]] + "</span> " +
          escapeHtml(certificateText(check, data.reasons)) + "</li>";
      }).join("");
      var lines = row[ROW.top].map(function (top) {
        return '<div class="context"><b>' + fmt(top[1]) + "</b>  " + contextHtml(top[0], top[1], row[ROW.maxCode]) + "</div>";
      }).join("");
      var detail = document.createElement("tr");
      detail.className = "detail";
      detail.innerHTML = '<td class="text" colspan="' + kinds.length + '">' +
        (checks ? "<ul class=\"certificates\">" + checks + "</ul>" : "<p>No certificate: no condition has a descent.</p>") +
        (lines || '<p class="muted">No contexts kept for this feature (snippets are decoded for the certified, the ' +
          "top-ranked and the pair map's features).</p>") + "</td>";
      tr.parentNode.insertBefore(detail, tr.nextSibling);
    }

    function update() { filter(); render(); }
    function ensure() {  // data-loaded: the milliseconds it took
      if (data !== null) return data;
      var started = performance.now();
      data = JSON.parse(source.textContent);
      source.textContent = "";  // the parsed rows replace the text: no second copy in memory
      update();
      table.setAttribute("data-loaded", Math.round(performance.now() - started));
      return data;
    }
    function when(fn) { return function (event) { ensure(); fn(event); }; }
    each(table.tHead.rows[0].cells, function (header, column) {
      header.title = "click to sort";
      header.addEventListener("click", when(function () {
        state.ascending = !(state.column === column && state.ascending);
        state.column = column;
        state.page = 0;
        markSorted(table, header, state.ascending);
        update();
      }));
    });
    controls.querySelector(".feature-search").addEventListener("input", when(function (event) {
      var ranges = parseIds(event.target.value);
      state.bad = ranges === null;
      state.ids = ranges || [];
      state.page = 0;
      update();
    }));
    controls.querySelector(".tier-filter").addEventListener("change", when(function (event) {
      state.tier = event.target.value; state.page = 0; update();
    }));
    controls.querySelector(".condition-filter").addEventListener("change", when(function (event) {
      state.condition = event.target.value; state.page = 0; update();
    }));
    controls.querySelector(".page-size").addEventListener("change", when(function (event) {
      state.size = parseInt(event.target.value, 10); state.page = 0; render();
    }));
    var pageButtons = { "page-first": function () { return 0; }, "page-prev": function () { return state.page - 1; },
                        "page-next": function () { return state.page + 1; }, "page-last": function () { return Infinity; } };
    Object.keys(pageButtons).forEach(function (name) {
      controls.querySelector("." + name).addEventListener("click", when(function () {
        state.page = pageButtons[name](); render();
      }));
    });
    table.tBodies[0].addEventListener("click", function (event) {
      if (event.target.closest("a")) return;  // a link opens its page, the row stays as it is
      var tr = event.target.closest("tr");
      if (tr && !tr.classList.contains("detail")) details(tr);
    });
    return { ensure: ensure, table: table };
  }

  var featureTables = {};
  each(document.querySelectorAll("script.feature-data"), function (script) {
    var layer = script.getAttribute("data-layer");
    var table = document.querySelector('table.features[data-layer="' + layer + '"]');
    var controls = document.querySelector('.table-controls[data-layer="' + layer + '"]');
    featureTables[layer] = FeatureTable(table, script, controls);
  });
  var pending = Object.keys(featureTables).map(function (layer) { return featureTables[layer]; });
  // the tables in view now are drawn before the page shows (an observer reports only after the
  // first frame); a section's box is known without laying out its skipped content
  pending.forEach(function (t) {
    var box = t.table.closest("section").getBoundingClientRect();
    if (box.bottom > -800 && box.top < window.innerHeight + 800) t.ensure();
  });
  if (window.IntersectionObserver) {
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (!entry.isIntersecting) return;
        observer.unobserve(entry.target);
        pending.forEach(function (t) { if (t.table === entry.target) t.ensure(); });
      });
    }, { rootMargin: "800px 0px" });
    pending.forEach(function (t) { observer.observe(t.table); });
  }
  // the rest one at a time while the reader is idle, so a search or a print finds them drawn
  var idle = window.requestIdleCallback || function (fn) { return setTimeout(fn, 200); };
  function drawNext() {
    var next = pending.shift();
    if (!next) return;
    next.ensure();
    idle(drawNext);
  }
  window.addEventListener("load", function () { idle(drawNext); });

  // ---- plots: a tooltip that follows the pointer (the SVG <title>s, shown at once), and zoom
  // by dragging a box (scatter) or a range (histogram); a double click goes back.
  var tip = document.createElement("div");
  tip.id = "plot-tip";
  tip.hidden = true;
  body.appendChild(tip);
  each(document.querySelectorAll("svg [data-tip], svg rect > title, svg line > title"), function (node) {
    var target = node.tagName.toLowerCase() === "title" ? node.parentNode : node;
    if (node !== target) {
      target.setAttribute("data-tip", node.textContent);
      node.remove();  // the browser's own tooltip would show a second, late copy
    }
  });
  document.addEventListener("mousemove", function (event) {
    var target = event.target.closest ? event.target.closest("svg [data-tip], svg circle[data-x]") : null;
    if (!target) { tip.hidden = true; return; }
    tip.textContent = target.hasAttribute("data-tip") ? target.getAttribute("data-tip") :
      "z_i " + fmt(Number(target.getAttribute("data-x"))) + ", z_j " + fmt(Number(target.getAttribute("data-y")));
    tip.style.left = (event.pageX + 12) + "px";
    tip.style.top = (event.pageY + 12) + "px";
    tip.hidden = false;
  });

  function svgPoint(svg, event) {
    var point = svg.createSVGPoint();
    point.x = event.clientX; point.y = event.clientY;
    return point.matrixTransform(svg.getScreenCTM().inverse());
  }

  function dragZoom(svg, frame, onZoom, onReset, horizontalOnly) {
    var start = null, box = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    box.setAttribute("class", "zoom-box");
    box.style.display = "none";
    svg.appendChild(box);
    svg.addEventListener("mousedown", function (event) {
      start = svgPoint(svg, event);
      event.preventDefault();
    });
    svg.addEventListener("mousemove", function (event) {
      if (!start) return;
      var now = svgPoint(svg, event);
      box.setAttribute("x", Math.min(start.x, now.x));
      box.setAttribute("width", Math.abs(now.x - start.x));
      box.setAttribute("y", horizontalOnly ? frame.top : Math.min(start.y, now.y));
      box.setAttribute("height", horizontalOnly ? frame.height : Math.abs(now.y - start.y));
      box.style.display = "";
    });
    window.addEventListener("mouseup", function (event) {
      if (!start) return;
      var now = svgPoint(svg, event), from = start;
      start = null;
      box.style.display = "none";
      if (Math.abs(now.x - from.x) < 4 && (horizontalOnly || Math.abs(now.y - from.y) < 4)) return;  // a click
      var fx = function (x) { return Math.min(1, Math.max(0, (x - frame.left) / frame.width)); };
      var fy = function (y) { return Math.min(1, Math.max(0, 1 - (y - frame.top) / frame.height)); };
      onZoom(Math.min(fx(from.x), fx(now.x)), Math.max(fx(from.x), fx(now.x)),
             Math.min(fy(from.y), fy(now.y)), Math.max(fy(from.y), fy(now.y)));
    });
    svg.addEventListener("dblclick", onReset);
  }

  function frameOf(svg) {
    var parts = svg.getAttribute("data-frame").split(" ").map(Number);
    return { left: parts[0], top: parts[1], width: parts[2], height: parts[3] };
  }

  each(document.querySelectorAll("svg.scatter"), function (svg) {
    var frame = frameOf(svg), full = [0, Number(svg.getAttribute("data-x-max")), 0, Number(svg.getAttribute("data-y-max"))];
    var domain = full.slice();
    var points = svg.querySelectorAll("circle[data-x]"), hull = svg.querySelector("line.hull");
    var threshold = svg.querySelector("line.threshold");
    function px(x) { return frame.left + frame.width * (x - domain[0]) / (domain[1] - domain[0]); }
    function py(y) { return frame.top + frame.height * (1 - (y - domain[2]) / (domain[3] - domain[2])); }
    function within(y) { return Math.min(frame.top + frame.height, Math.max(frame.top, py(y))); }
    function draw() {
      var zoomed = domain.some(function (v, k) { return v !== full[k]; });
      each(points, function (point) {
        var x = Number(point.getAttribute("data-x")), y = Number(point.getAttribute("data-y"));
        point.setAttribute("cx", px(x).toFixed(1));
        point.setAttribute("cy", py(y).toFixed(1));
        point.style.display = x >= domain[0] && x <= domain[1] && y >= domain[2] && y <= domain[3] ? "" : "none";
      });
      // the hull lies on x = 0, clipped to the shown y range; the threshold is a horizontal line
      var lo = Number(hull.getAttribute("data-lo")), hi = Number(hull.getAttribute("data-hi"));
      hull.setAttribute("y1", within(lo).toFixed(1));
      hull.setAttribute("y2", within(hi).toFixed(1));
      hull.style.display = domain[0] === 0 && hi >= domain[2] && lo <= domain[3] ? "" : "none";
      var t = Number(threshold.getAttribute("data-y"));
      threshold.setAttribute("y1", py(t).toFixed(1));
      threshold.setAttribute("y2", py(t).toFixed(1));
      threshold.style.display = t >= domain[2] && t <= domain[3] ? "" : "none";
      each(svg.querySelectorAll(".full-only"), function (label) { label.style.display = zoomed ? "none" : ""; });
      svg.querySelector(".x-lo").textContent = fmt(domain[0]);
      svg.querySelector(".x-hi").textContent = fmt(domain[1]);
      svg.querySelector(".y-lo").textContent = domain[2] ? fmt(domain[2]) : "";
      svg.querySelector(".y-hi").textContent = fmt(domain[3]);
      svg.setAttribute("data-domain", domain.join(" "));
    }
    dragZoom(svg, frame, function (x0, x1, y0, y1) {
      var width = domain[1] - domain[0], height = domain[3] - domain[2];
      domain = [domain[0] + x0 * width, domain[0] + x1 * width, domain[2] + y0 * height, domain[2] + y1 * height];
      draw();
    }, function () { domain = full.slice(); draw(); }, false);
  });

  each(document.querySelectorAll("svg.histogram[data-layer]"), function (svg) {
    var features = featureTables[svg.getAttribute("data-layer")];
    if (!features) return;
    var column = Number(svg.getAttribute("data-column")), frame = frameOf(svg), values = null;
    function sizes() {  // the live features' sizes, from the layer's table (parsed on first zoom)
      if (values !== null) return values;
      var data = features.ensure(), dead = {};
      data.dead.forEach(function (id) { dead[id] = true; });
      values = [];
      data.rows.forEach(function (row) {
        if (!dead[row[ROW.id]] && row[column] !== null) values.push(row[column]);
      });
      return values;
    }
    var full = [Number(svg.getAttribute("data-lo")), Number(svg.getAttribute("data-hi"))], range = full.slice();
    var bars = svg.querySelectorAll("rect.bar"), labels = [".x-lo", ".x-hi", ".y-hi"];
    // the page's own drawing, put back on reset (its counts are of the exact values, the
    // re-binned ones of the table's 4 significant digits)
    var original = Array.prototype.map.call(bars, function (bar) {
      return [bar.getAttribute("y"), bar.getAttribute("height"), bar.getAttribute("data-tip")];
    });
    var originalLabels = labels.map(function (name) { return svg.querySelector(name).textContent; });
    function reset() {
      range = full.slice();
      each(bars, function (bar, k) {
        bar.setAttribute("y", original[k][0]);
        bar.setAttribute("height", original[k][1]);
        bar.setAttribute("data-tip", original[k][2]);
      });
      labels.forEach(function (name, k) { svg.querySelector(name).textContent = originalLabels[k]; });
      svg.removeAttribute("data-range");
    }
    function draw() {
      var bins = bars.length, span = (range[1] - range[0]) || 1, counts = [], k;
      for (k = 0; k < bins; k++) counts.push(0);
      sizes().forEach(function (v) {
        if (v < range[0] || v > range[1]) return;
        counts[Math.min(bins - 1, Math.max(0, Math.floor((v - range[0]) / span * bins)))] += 1;
      });
      var peak = Math.sqrt(Math.max.apply(null, counts.concat([1])));
      each(bars, function (bar, k) {
        var h = frame.height * Math.sqrt(counts[k]) / peak;
        bar.setAttribute("y", (frame.top + frame.height - h).toFixed(1));
        bar.setAttribute("height", h.toFixed(1));
        bar.setAttribute("data-tip", "[" + fmt(range[0] + span * k / bins) + ", " + fmt(range[0] + span * (k + 1) / bins) +
          "): " + counts[k].toLocaleString("en-US"));
      });
      svg.querySelector(".x-lo").textContent = fmt(range[0]);
      svg.querySelector(".x-hi").textContent = fmt(range[1]);
      svg.querySelector(".y-hi").textContent = Math.max.apply(null, counts).toLocaleString("en-US");
      svg.setAttribute("data-range", range[0] + " " + range[1] + " " + counts.reduce(function (a, b) { return a + b; }, 0));
    }
    dragZoom(svg, frame, function (x0, x1) {
      var width = range[1] - range[0];
      range = [range[0] + x0 * width, range[0] + x1 * width];
      draw();
    }, reset, true);
  });

  body.setAttribute("data-ready-ms", Math.round(performance.now()));
  if (body.getAttribute("data-report-status") === "loading") body.setAttribute("data-report-status", "ready");
})();
