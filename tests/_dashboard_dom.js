// Runs the dashboard's app.js in node against a minimal DOM and prints the client table it draws (JSON):
// what `test_dashboard.py` compares with the page's header. The snapshot comes on stdin.
"use strict";
const fs = require("fs");
const vm = require("vm");

class Node_ {
  constructor(tag) { this.tag = tag; this.children = []; this.textContent = ""; this.hidden = false; this.style = {}; }
  appendChild(child) { this.children.push(child); return child; }
  replaceChildren(...kids) { this.children = kids; }
  setAttribute() {}
  get tBodies() { this._body = this._body || new Node_("tbody"); return [this._body]; }
  text() { return this.children.length ? this.children.map((c) => c.text()).join("") : String(this.textContent); }
}
const nodes = new Map();
const document = {
  title: "",
  getElementById: (id) => { if (!nodes.has(id)) nodes.set(id, new Node_("#" + id)); return nodes.get(id); },
  createElement: (tag) => new Node_(tag),
  createElementNS: (_ns, tag) => new Node_(tag),
};
const snapshot = JSON.parse(fs.readFileSync(0, "utf8"));
const context = {
  window: { location: { search: "" }, setTimeout: () => {} },
  document, Node: Node_, URLSearchParams, Math, Number, String, JSON, Date, Object,
  fetch: () => new Promise(() => {}),  // the page's first poll never answers: render is called below
};
vm.createContext(context);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8") + "\nrender(" + JSON.stringify(snapshot) + ");", context);
const rows = document.getElementById("clients").tBodies[0].children;
process.stdout.write(JSON.stringify(rows.map((tr) => tr.children.map((td) => td.text()))));
