// The memory page: lists a project's tasks newest first, searches them as a new chat
// would recall them, and forgets a task (every episode of it) on a confirmed click.
// The token, when the bridge has one, is asked for in a form, kept for this tab only
// (sessionStorage) and sent in the Authorization header, never in a URL.
"use strict";

const TOKEN_KEY = "graphiti-bridge-token";
const state = { project: null, next: null, searching: false };
const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

async function api(path, params, method = "GET") {
  const headers = { "X-Memory-Page": "1" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const query = new URLSearchParams(params).toString();
  const response = await fetch(`/memory/api/${path}${query ? "?" + query : ""}`, {
    method, headers, cache: "no-store", credentials: "omit",
  });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (response.status === 401) throw new Unauthorized(body.error);
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function day(at) {
  return at > 0 ? new Date(at * 1000).toISOString().slice(0, 16).replace("T", " ") : "earlier";
}

function taskItem(task) {
  const item = element("li", "task");
  item.dataset.task = task.uuid;
  const head = element("div", "head");
  head.append(element("span", "when", day(task.at)));
  head.append(element("span", `outcome ${task.outcome}`, task.outcome));
  if (task.query) head.append(element("span", "query", task.query));
  const forget = element("button", "forget", "Forget");
  forget.type = "button";
  forget.addEventListener("click", () => forgetTask(task, item, forget));
  head.append(forget);
  item.append(head);
  if (task.summary) item.append(element("p", "summary", task.summary));
  for (const [list, className] of [[task.files, "files"], [task.errors, "errors"]]) {
    if (!list.length) continue;
    const ul = element("ul", className);
    for (const text of list) ul.append(element("li", null, text));
    item.append(ul);
  }
  return item;
}

async function forgetTask(task, item, button) {
  if (!button.classList.contains("armed")) {  // the first click asks to be sure
    button.classList.add("armed");
    button.textContent = "Forget this task?";
    return;
  }
  button.disabled = true;
  try {
    const done = await api("forget", { project: state.project, task: task.uuid }, "POST");
    item.remove();
    say(`Forgot ${done.forgotten} episode${done.forgotten === 1 ? "" : "s"} of "${task.query || task.uuid}".`);
  } catch (error) {
    button.disabled = false;
    fail(error);
  }
}

function say(text) { $("status").textContent = text; $("status").classList.remove("problem"); }

function fail(error) {
  if (error instanceof Unauthorized) return askToken(error.message);
  $("status").textContent = error.message;
  $("status").classList.add("problem");
}

async function showTasks(more = false) {
  const params = { project: state.project };
  if (more && state.next) params.before = state.next;
  const page = await api("tasks", params);
  if (!more) $("tasks").replaceChildren();
  for (const task of page.tasks) $("tasks").append(taskItem(task));
  state.next = page.next;
  state.searching = false;
  $("more").hidden = page.next === null;
  $("files").hidden = true;
  $("show-all").hidden = true;
  if (!more) say(page.tasks.length ? "" : "Memory holds no task of this project.");
}

async function search(text) {
  const found = await api("search", { project: state.project, q: text });
  state.searching = true;
  $("tasks").replaceChildren(...found.tasks.map(taskItem));
  $("files").textContent = found.files.length ? `Files likely involved: ${found.files.join(", ")}` : "";
  $("files").hidden = !found.files.length;
  $("more").hidden = true;
  $("show-all").hidden = false;
  say(found.tasks.length ? "" : "Nothing in memory matches.");
}

async function start() {
  try {
    const listed = await api("projects");
    $("token-form").hidden = true;
    $("memory").hidden = false;
    const projects = listed.projects.length ? listed.projects : [listed.default];
    state.project = projects.includes(listed.default) ? listed.default : projects[0];
    const select = $("project");
    select.replaceChildren(...projects.map((name) => {
      const option = element("option", null, name);
      option.value = name;
      option.selected = name === state.project;
      return option;
    }));
    $("project-choice").hidden = projects.length < 2;
    $("project-name").textContent = projects.length < 2 ? state.project : "";
    await showTasks();
  } catch (error) {
    fail(error);
  }
}

function askToken(problem) {
  $("memory").hidden = true;
  $("token-form").hidden = false;
  $("token-problem").textContent = sessionStorage.getItem(TOKEN_KEY) ? problem : "";
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    start();
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("search").value.trim();
    (text ? search(text) : showTasks()).catch(fail);
  });
  $("show-all").addEventListener("click", () => { $("search").value = ""; showTasks().catch(fail); });
  $("more").addEventListener("click", () => showTasks(true).catch(fail));
  $("project").addEventListener("change", (event) => {
    state.project = event.target.value;
    $("search").value = "";
    showTasks().catch(fail);
  });
  start();
});
