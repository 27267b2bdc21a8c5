/**
 * The plugin's hooks against a real bridge process (python -m bridge serve, started and
 * stopped here). OpenCode itself is not running in these tests: they call the hooks the
 * way OpenCode does, with the hook and event shapes of @opencode-ai/plugin and
 * @opencode-ai/sdk. tests/test_plugin.py runs the real OpenCode with this plugin.
 */
import type { PluginInput } from "@opencode-ai/plugin"
import type { AssistantMessage, Event, Part, TextPart, ToolPart, UserMessage } from "@opencode-ai/sdk"
import { describe, expect, setDefaultTimeout, test } from "bun:test"
import {
  backoffDelay,
  BridgeClient,
  createHooks,
  DEFAULT_DEADLINE_MS,
  DEFAULT_QUEUE,
  DEFAULT_URL,
  ERROR_PREFIX,
  GraphitiMemoryPlugin,
  type HookOptions,
  type Logger,
  type Outgoing,
  projectName,
  settingsFromEnv,
  SUMMARY_CHARS,
} from "../graphiti-memory.ts"
import plugin from "../graphiti-memory.ts"
import { defaultQueueDir } from "../lib/durable-queue.ts"
import type { WithParts } from "../lib/session-memory.ts"
import { readdirSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { ask, Cleanups, exportEpisodes, freePort, until } from "./bridge.ts"
import { capture, promptMessage, recordedHooks, WORKTREE } from "./hooks.ts"

// -- fixtures -----------------------------------------------------------------------------

// A test starts one or two bridges (each up to 30 s on a busy machine) and waits at most
// 10 s for anything else.
setDefaultTimeout(60_000)

const cleanups = new Cleanups()

function hooksFor(url: string, options: Partial<HookOptions> = {}) {
  return recordedHooks(cleanups, url, options)
}

/** The messages of one type the hooks sent. */
function ofType<T extends Outgoing["type"]>(sent: Outgoing[], type: T): Extract<Outgoing, { type: T }>[] {
  return sent.filter((message): message is Extract<Outgoing, { type: T }> => message.type === type)
}

let seq = 0
function userMessage(
  sessionID: string,
  text: string,
): { input: any; output: { message: UserMessage; parts: Part[] } } {
  seq++
  const messageID = `msg_${String(seq).padStart(4, "0")}user`
  const part: TextPart = {
    id: `prt_${String(seq).padStart(12, "0")}abcdefghij`,
    sessionID,
    messageID,
    type: "text",
    text,
  }
  const message = promptMessage(sessionID, messageID)
  return {
    input: { sessionID, agent: "build", model: { providerID: "local", modelID: "stub" }, messageID },
    output: { message, parts: [part] },
  }
}

type Hooked = ReturnType<typeof hooksFor>["hooks"]

/** Run the chat.message hook like OpenCode does; returns the elapsed time and the message. */
async function chat(hooks: Hooked, sessionID: string, text: string) {
  const { input, output } = userMessage(sessionID, text)
  const before = structuredClone(output.parts)
  const started = performance.now()
  await hooks["chat.message"]!(input, output)
  const stored: WithParts = { info: output.message, parts: output.parts }
  return {
    elapsed: performance.now() - started,
    parts: output.parts,
    before,
    message: output.message,
    stored,
  }
}

/**
 * Run the messages transform on a copy of the messages of a model request, as OpenCode does
 * before it asks the model; the request's messages after it.
 */
async function request(hooks: Hooked, messages: WithParts[]): Promise<WithParts[]> {
  const copy = structuredClone(messages)
  await hooks["experimental.chat.messages.transform"]!({}, { messages: copy })
  return copy
}

/** The memory contexts in a model request's messages (synthetic text parts that are one). */
function memoryOf(messages: WithParts[]): string[] {
  return messages
    .flatMap((m) => m.parts)
    .filter((p): p is TextPart => p.type === "text" && p.synthetic === true)
    .map((p) => p.text)
    .filter((text) => text.startsWith("[Memory Context]"))
}

/** The memory a chat request made right after `turn` would carry (undefined: none). */
async function memoryAfter(hooks: Hooked, turn: { stored: WithParts }): Promise<string | undefined> {
  const memory = memoryOf(await request(hooks, [turn.stored]))
  expect(memory.length).toBeLessThanOrEqual(1)
  return memory[0]
}

function fileEdited(file: string): { event: Event } {
  return { event: { type: "file.edited", properties: { file } } }
}

function status(sessionID: string, type: "busy" | "idle"): { event: Event } {
  return { event: { type: "session.status", properties: { sessionID, status: { type } } } }
}

function toolPart(
  sessionID: string,
  callID: string,
  tool: string,
  state: ToolPart["state"],
  messageID = "msg_tools",
): { event: Event } {
  const part: ToolPart = { id: `prt_${callID}`, sessionID, messageID, type: "tool", callID, tool, state }
  return { event: { type: "message.part.updated", properties: { part } } }
}

function textPart(sessionID: string, messageID: string, id: string, text: string): { event: Event } {
  const part: TextPart = { id, sessionID, messageID, type: "text", text }
  return { event: { type: "message.part.updated", properties: { part } } }
}

/** A tool call as OpenCode runs it: tool.execute.before, then (if it returns) .after. */
async function toolCall(
  hooks: ReturnType<typeof hooksFor>["hooks"],
  call: { sessionID: string; callID: string; tool: string; args: Record<string, unknown> },
  result?: { output: string; metadata: Record<string, unknown> },
): Promise<void> {
  const { sessionID, callID, tool, args } = call
  await hooks["tool.execute.before"]!({ tool, sessionID, callID }, { args })
  if (result)
    await hooks["tool.execute.after"]!({ tool, sessionID, callID, args }, { title: tool, ...result })
}

/** A session's `write` tool call writing `path` (under the worktree), then OpenCode's file.edited. */
async function writeFile(
  hooks: ReturnType<typeof hooksFor>["hooks"],
  sessionID: string,
  callID: string,
  path: string,
): Promise<void> {
  await toolCall(hooks, { sessionID, callID, tool: "write", args: { filePath: path } })
  await hooks.event!(fileEdited(`${WORKTREE.directory}/${path}`))
}

function assistant(fields: Partial<AssistantMessage> & Pick<AssistantMessage, "id" | "parentID" | "time">): {
  event: Event
} {
  const info: AssistantMessage = {
    sessionID: "ses_1",
    role: "assistant",
    modelID: "stub",
    providerID: "local",
    mode: "build",
    path: { cwd: "/work/shop", root: "/work/shop" },
    cost: 0,
    tokens: { input: 0, output: 0, reasoning: 0, cache: { read: 0, write: 0 } },
    ...fields,
  }
  return { event: { type: "message.updated", properties: { info } } }
}

// -- settings, names, backoff ------------------------------------------------------------

describe("settings", () => {
  test("come from the environment, and bad values fall back to the defaults", () => {
    expect(settingsFromEnv({})).toEqual({
      url: DEFAULT_URL,
      token: undefined,
      deadlineMs: DEFAULT_DEADLINE_MS,
      maxQueue: DEFAULT_QUEUE,
      project: undefined,
    })
    expect(
      settingsFromEnv({
        GRAPHITI_BRIDGE_URL: "ws://127.0.0.1:9999/x",
        GRAPHITI_BRIDGE_TOKEN: "tok",
        GRAPHITI_BRIDGE_DEADLINE_MS: "150",
        GRAPHITI_BRIDGE_QUEUE: "7",
        GRAPHITI_BRIDGE_QUEUE_DIR: "/var/tmp/queue",
        GRAPHITI_BRIDGE_PROJECT: "shop",
      }),
    ).toEqual({
      url: "ws://127.0.0.1:9999/x",
      token: "tok",
      deadlineMs: 150,
      maxQueue: 7,
      queueDir: "/var/tmp/queue",
      project: "shop",
    })
    // The queue's default folder: one per project directory, under the user's state folder.
    expect(defaultQueueDir({ XDG_STATE_HOME: "/st" }, "/home/me/shop")).toMatch(
      /^\/st\/opencode-graphiti-memory\/shop-[0-9a-f]{12}$/,
    )
    expect(defaultQueueDir({ HOME: "/home/me" }, "/home/me/shop")).toStartWith(
      "/home/me/.local/state/opencode-graphiti-memory/shop-",
    )
    expect(defaultQueueDir({}, "/a/shop")).not.toBe(defaultQueueDir({}, "/b/shop"))
    const { log, lines } = capture()
    const bad = settingsFromEnv(
      { GRAPHITI_BRIDGE_URL: "http://x", GRAPHITI_BRIDGE_DEADLINE_MS: "soon", GRAPHITI_BRIDGE_QUEUE: "-1" },
      log,
    )
    expect(bad).toMatchObject({ url: DEFAULT_URL, deadlineMs: DEFAULT_DEADLINE_MS, maxQueue: DEFAULT_QUEUE })
    expect(lines.length).toBe(3)
    expect(DEFAULT_DEADLINE_MS).toBeLessThan(1000)
  })

  test("the project is the worktree's folder name unless set", () => {
    expect(projectName({ worktree: "/home/me/shop", directory: "/home/me/shop/src" })).toBe("shop")
    expect(projectName({ worktree: "/", directory: "/tmp/scratch/" })).toBe("scratch")
    expect(projectName({ worktree: "/", directory: "/" })).toBe("default")
    expect(projectName({ worktree: "/home/me/shop", directory: "/" }, "other")).toBe("other")
  })

  test("reconnect delays grow exponentially, are capped and jittered", () => {
    for (let attempt = 0; attempt < 40; attempt++) {
      const ceiling = Math.min(30_000, 250 * 2 ** attempt)
      const delay = backoffDelay(attempt, 250, 30_000)
      expect(delay).toBeGreaterThanOrEqual(Math.floor(ceiling / 2))
      expect(delay).toBeLessThanOrEqual(ceiling)
    }
    const samples = new Set(Array.from({ length: 50 }, () => backoffDelay(10, 250, 30_000)))
    expect(samples.size).toBeGreaterThan(1)
  })

  test("OpenCode sees one plugin: the default export's id and server", () => {
    expect(plugin.id).toBe("graphiti-memory")
    expect(plugin.server).toBe(GraphitiMemoryPlugin)
  })
})

// -- against a real bridge ---------------------------------------------------------------

describe("with a running bridge", () => {
  test("a session's first prompt gets the bridge's context; chat requests carry it in a message of its own after the prompt", async () => {
    const bridge = await cleanups.bridge()
    const [ack] = await ask(bridge.url, [
      { type: "error", id: 1, project: "shop", message: "TypeError in checkout: total is undefined" },
    ])
    expect(ack.ok).toBe(true)
    const { hooks, project } = hooksFor(bridge.url)
    expect(project).toBe("shop")

    const turn = await chat(hooks, "ses_1", "why does checkout fail?")

    // The person's message is stored as it came: memory is no part of the session.
    expect(turn.parts).toEqual(turn.before)
    const messages = await request(hooks, [turn.stored])
    expect(messages.length).toBe(2)
    expect(messages[0]).toEqual(turn.stored)
    const [direct] = await ask(bridge.url, [
      { type: "chat:start", id: 2, project: "shop", query: "why does checkout fail?" },
    ])
    expect(direct.inject).toStartWith("[Memory Context]")
    expect(direct.inject).toContain("TypeError in checkout: total is undefined")
    const added = messages[1]!
    expect(added.info).toMatchObject({ role: "user", sessionID: "ses_1" })
    expect(added.info.id).not.toBe(turn.message.id)
    expect(added.parts).toMatchObject([
      { type: "text", synthetic: true, sessionID: "ses_1", messageID: added.info.id, text: direct.inject },
    ])
  })

  test("memory is asked for once per session and again after a compaction; the compaction request goes without it", async () => {
    const bridge = await cleanups.bridge()
    const seed = async (message: string): Promise<void> => {
      const [ack] = await ask(bridge.url, [{ type: "error", id: 1, project: "shop", message }])
      expect(ack.ok).toBe(true)
    }
    await seed("flaky retry in the payment client")
    const { hooks, sent } = hooksFor(bridge.url, { deadlineMs: 5000 })
    const reply = (id: string, parentID: string): WithParts => ({
      info: (assistant({ id, parentID, time: { created: 1, completed: 2 } }).event as any).properties.info,
      parts: [{ id: `prt_${id}`, sessionID: "ses_1", messageID: id, type: "text", text: "Done." }],
    })

    const first = await chat(hooks, "ses_1", "fix the payment client retry")
    await seed("payment client timeout raised to 30 s")
    const second = await chat(hooks, "ses_1", "and the payment client timeout?")
    // Every prompt opens its task at the bridge, but only the first one's context is used:
    // each request of the session carries it once, right after the first prompt.
    expect(ofType(sent, "chat:start").map((m) => m.query)).toEqual([
      "fix the payment client retry",
      "and the payment client timeout?",
    ])
    const history = [first.stored, reply("msg_r1", first.message.id), second.stored]
    const before = await request(hooks, history)
    expect(before.map((m) => m.info.id)).toEqual([
      first.message.id,
      `${first.message.id}-memory`,
      "msg_r1",
      second.message.id,
    ])
    const [memory] = memoryOf(before)
    expect(memory).toContain("flaky retry in the payment client")
    expect(memory).not.toContain("timeout raised")

    // OpenCode compacts the session: its compaction request (the history, summarised) goes
    // without memory.
    await hooks["experimental.session.compacting"]!({ sessionID: "ses_1" }, { context: [] })
    expect(memoryOf(await request(hooks, history))).toEqual([])
    await hooks.event!({ event: { type: "session.compacted", properties: { sessionID: "ses_1" } } })

    // The requests after it carry the memory again, after the first message past the marker.
    const marker: WithParts = {
      info: { ...first.message, id: "msg_c0" },
      parts: [{ id: "prt_c0", sessionID: "ses_1", messageID: "msg_c0", type: "compaction", auto: true }],
    }
    const summary = reply("msg_c1", "msg_c0")
    const resumed = userMessage("ses_1", "Continue if you have next steps")
    ;(resumed.output.parts[0] as TextPart).synthetic = true
    const window = [marker, summary, { info: resumed.output.message, parts: resumed.output.parts }]
    const after = await request(hooks, window)
    expect(after.map((m) => m.info.id)).toEqual([
      "msg_c0",
      "msg_c1",
      resumed.output.message.id,
      `${resumed.output.message.id}-memory`,
    ])
    expect(memoryOf(after)).toEqual([memory!])

    // The next prompt asks again, and its context (what memory holds now) takes over.
    const third = await chat(hooks, "ses_1", "is the payment client done?")
    const latest = memoryOf(await request(hooks, [...window, third.stored]))
    expect(latest.length).toBe(1)
    expect(latest[0]).toContain("payment client timeout raised to 30 s")
  })

  test("a chat about something memory does not hold gets no memory", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client } = hooksFor(bridge.url)
    expect(await client.opened(5000)).toBe(true)
    const turn = await chat(hooks, "ses_1", "hello there")
    expect(turn.parts).toEqual(turn.before)
    expect(await memoryAfter(hooks, turn)).toBeUndefined()
  })

  test("a file.edited event is stored as an episode that a later chat recalls", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    await hooks.event!(fileEdited("/work/shop/src/parser.ts"))
    expect(await client.drained(5000)).toBe(true)

    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual(["Modified: /work/shop/src/parser.ts"])
    expect(episodes[0].metadata).toMatchObject({ type: "file_edit", path: "/work/shop/src/parser.ts" })
    // No session was active: the event says none rather than guess.
    expect(ofType(sent, "file:write")[0]).not.toHaveProperty("session")
    const turn = await chat(hooks, "ses_1", "what changed in parser.ts lately?")
    expect(await memoryAfter(hooks, turn)).toContain("/work/shop/src/parser.ts")
  })

  test("a file.edited goes to the session whose tool call wrote it, else the busy, else the last active one", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    const a = await chat(hooks, "ses_a", "rename the parser module")
    await chat(hooks, "ses_b", "tidy the docs")
    await hooks.event!(status("ses_a", "busy"))
    await hooks.event!(status("ses_b", "busy"))
    const expected: Array<[string, string]> = []
    const edited = async (file: string, session: string): Promise<void> => {
      await hooks.event!(fileEdited(file))
      expected.push([file, session])
    }

    // ses_a's write names the file (relative to the worktree): ses_a's, though ses_b went
    // busy later. OpenCode publishes file.edited while the tool runs.
    const write = { sessionID: "ses_a", callID: "call_1", tool: "write", args: { filePath: "src/parser.ts" } }
    await hooks["tool.execute.before"]!(write, { args: write.args })
    await edited("/work/shop/src/parser.ts", "ses_a")
    await hooks["tool.execute.after"]!(
      { ...write, args: write.args },
      { title: "src/parser.ts", output: "Wrote file successfully.", metadata: {} },
    )
    // Edited again after the call returned (a formatter, say): still the call that named it.
    await edited("/work/shop/src/parser.ts", "ses_a")
    // A patch names its files in its text; here only the tool part shows the call running.
    const patch = "*** Begin Patch\n*** Update File: docs/guide.md\n@@\n-old\n+new\n*** End Patch"
    const running = { status: "running" as const, input: { patchText: patch }, time: { start: 1 } }
    await hooks.event!(toolPart("ses_b", "call_2", "apply_patch", running))
    await edited("/work/shop/docs/guide.md", "ses_b")
    // A file no call names: the session whose call is still running.
    await edited("/work/shop/docs/index.md", "ses_b")
    const done = { ...running, status: "completed" as const, output: "ok", title: "patch", metadata: {} }
    await hooks.event!(toolPart("ses_b", "call_2", "apply_patch", { ...done, time: { start: 1, end: 2 } }))
    // No call running: the session that went busy last and is not idle.
    await edited("/work/shop/CHANGELOG.md", "ses_b")
    await hooks.event!({ event: { type: "session.idle", properties: { sessionID: "ses_b" } } })
    await edited("/work/shop/LICENSE", "ses_a")
    // Nobody busy: the session active last (ses_a's reply streams after ses_b's call).
    await hooks.event!(
      assistant({ id: "msg_a1", sessionID: "ses_a", parentID: a.message.id, time: { created: 1 } }),
    )
    await hooks.event!(status("ses_a", "idle"))
    await edited("/work/shop/NOTES.md", "ses_a")
    expect(await client.drained(5000)).toBe(true)

    const writes = ofType(sent, "file:write")
    expect(writes.map((m) => [m.path, m.session])).toEqual(expected)
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => [e.metadata.path, e.metadata.session])).toEqual(expected)
    expect(client.stats).toMatchObject({ acked: expected.length, refused: 0 })
  })

  test("session.error becomes an error episode of its session; aborts and events without an error are not errors", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    const events: Event[] = [
      {
        type: "session.error",
        properties: {
          sessionID: "ses_1",
          error: { name: "MessageAbortedError", data: { message: "aborted" } },
        },
      },
      { type: "session.error", properties: { sessionID: "ses_1" } },
      {
        type: "session.error",
        properties: {
          sessionID: "ses_1",
          error: { name: "APIError", data: { message: "rate limited by provider", isRetryable: true } },
        },
      },
    ]
    for (const event of events) await hooks.event!({ event })
    // Without a session id: the session active last.
    await chat(hooks, "ses_2", "summarise the billing job")
    await hooks.event!({
      event: {
        type: "session.error",
        properties: { error: { name: "UnknownError", data: { message: "disk full" } } },
      },
    })
    expect(await client.drained(5000)).toBe(true)
    expect(ofType(sent, "error").map((m) => [m.message, m.session])).toEqual([
      ["APIError: rate limited by provider", "ses_1"],
      ["UnknownError: disk full", "ses_2"],
    ])
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => [e.body, e.metadata.session])).toEqual([
      ["Error: APIError: rate limited by provider", "ses_1"],
      ["Error: UnknownError: disk full", "ses_2"],
    ])
    for (const episode of episodes)
      expect(episode.metadata).toMatchObject({ type: "error", severity: "high" })
  })

  test("a failed tool call is an error of its session naming the tool, its file and what went wrong", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    await chat(hooks, "ses_1", "fix the flaky checkout test")
    const time = { start: 1, end: 2 }
    const edit = { filePath: "/work/shop/src/checkout.ts", oldString: "total =", newString: "total ??=" }
    // A tool that throws: OpenCode marks its part "error" (tool.execute.after never runs).
    await hooks["tool.execute.before"]!(
      { tool: "edit", sessionID: "ses_1", callID: "call_1" },
      { args: edit },
    )
    const failed = {
      status: "error" as const,
      input: edit,
      error: "Could not find oldString in the file.",
      time,
    }
    await hooks.event!(toolPart("ses_1", "call_1", "edit", failed))
    await hooks.event!(toolPart("ses_1", "call_1", "edit", failed)) // the same update again: once
    // A command that exits non-zero returns normally, with its exit code in the metadata.
    const output = "1 fail\nexpected 2, received 3"
    await toolCall(
      hooks,
      { sessionID: "ses_1", callID: "call_2", tool: "bash", args: { command: "bun test checkout" } },
      { output, metadata: { output, exit: 1 } },
    )
    await toolCall(
      hooks,
      { sessionID: "ses_1", callID: "call_3", tool: "bash", args: { command: "ls" } },
      { output: "src", metadata: { output: "src", exit: 0 } },
    )
    // Not failures: the person interrupted or refused the call.
    const read = { filePath: "/work/shop/src/cart.ts" }
    for (const [callID, error, metadata] of [
      ["call_4", "Tool execution aborted", undefined],
      ["call_5", "interrupted", { interrupted: true }],
      ["call_6", "The user rejected permission to use this specific tool call.", undefined],
    ] as const) {
      await hooks.event!(
        toolPart("ses_1", callID, "read", { status: "error", input: read, error, metadata, time }),
      )
    }
    expect(await client.drained(5000)).toBe(true)

    const bodies = [
      "Tool edit failed on /work/shop/src/checkout.ts: Could not find oldString in the file.",
      "Tool bash failed: exit code 1 from `bun test checkout`\n1 fail\nexpected 2, received 3",
    ]
    expect(ofType(sent, "error").map((m) => [m.message, m.session])).toEqual(bodies.map((b) => [b, "ses_1"]))
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => [e.body, e.metadata.session])).toEqual(
      bodies.map((b) => [`Error: ${b}`, "ses_1"]),
    )
  })

  test("a turn that wrote a file is one completion: the prompt as task, the final answer as summary", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    const turn = await chat(hooks, "ses_1", "add a retry to the payment client")
    const parentID = turn.message.id
    const t0 = 1_790_000_000_000
    const updates = [
      // the user's own message.updated, and an assistant message still streaming
      { event: { type: "message.updated", properties: { info: turn.message } } } as { event: Event },
      assistant({ id: "msg_a1", parentID, time: { created: t0 } }),
      textPart("ses_1", "msg_a1", "prt_a1_1", "Let me look at the client first."),
      // a step that ended in tool calls (a write among them), then the step that ends the task
      assistant({
        id: "msg_a1",
        parentID,
        time: { created: t0, completed: t0 + 400 },
        finish: "tool-calls",
        tokens: { input: 100, output: 20, reasoning: 5, cache: { read: 0, write: 0 } },
      }),
      assistant({ id: "msg_a2", parentID, time: { created: t0 + 500 } }),
      textPart("ses_1", "msg_a2", "prt_a2_2", "It backs off 100 ms, then 200 ms."),
      textPart("ses_1", "msg_a2", "prt_a2_1", ""),
      textPart("ses_1", "msg_a2", "prt_a2_1", "Added a retry with backoff to PaymentClient."),
      assistant({
        id: "msg_a2",
        parentID,
        time: { created: t0 + 500, completed: t0 + 1500 },
        finish: "stop",
        tokens: {
          total: 60,
          input: 40,
          output: 20,
          reasoning: 0,
          cache: { read: 0, write: 0 },
        } as AssistantMessage["tokens"],
      }),
      // the same completed message again: reported once
      assistant({
        id: "msg_a2",
        parentID,
        time: { created: t0 + 500, completed: t0 + 1500 },
        finish: "stop",
      }),
    ]
    for (const [i, update] of updates.entries()) {
      await hooks.event!(update)
      if (i === 3) {
        await writeFile(hooks, "ses_1", "c1", "src/pay.ts")
      }
    }
    expect(await client.drained(5000)).toBe(true)

    const summary = "Added a retry with backoff to PaymentClient.\nIt backs off 100 ms, then 200 ms."
    const [completion, ...more] = ofType(sent, "completion")
    expect(more).toEqual([])
    expect(completion).toMatchObject({
      task: "add a retry to the payment client",
      summary,
      tokens: 185,
      duration_ms: 1500,
      session: "ses_1",
    })
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual([
      "Modified: /work/shop/src/pay.ts",
      "Completed: add a retry to the payment client",
    ])
    expect(episodes[1].metadata).toMatchObject({
      type: "success",
      duration: 1500,
      tokens: 185,
      summary,
      session: "ses_1",
    })
  })

  test("a turn that changed nothing and hit no error is no task; one that only failed is", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    const t0 = 1_790_000_000_000
    const reply = async (
      parentID: string,
      id: string,
      text: string,
      extra: Partial<AssistantMessage> = {},
    ) => {
      await hooks.event!(assistant({ id, parentID, time: { created: t0 } }))
      await hooks.event!(textPart("ses_1", id, `prt_${id}`, text))
      await hooks.event!(
        assistant({ id, parentID, time: { created: t0, completed: t0 + 10 }, finish: "stop", ...extra }),
      )
    }

    // A question answered: nothing written, nothing failed.
    const question = await chat(hooks, "ses_1", "what does the retry policy do?")
    await reply(question.message.id, "msg_q", "It retries twice with backoff.")
    // A reply that failed is reported by session.error, never as a completion.
    const broken = await chat(hooks, "ses_1", "rewrite the retry policy")
    await writeFile(hooks, "ses_1", "w1", "retry.ts")
    await reply(broken.message.id, "msg_b", "", {
      error: { name: "UnknownError", data: { message: "boom" } },
    })
    // A turn that only hit an error is a task (it was tried).
    const tried = await chat(hooks, "ses_1", "run the payment tests")
    await toolCall(
      hooks,
      { sessionID: "ses_1", callID: "t1", tool: "bash", args: { command: "bun test payment" } },
      { output: "2 fail", metadata: { exit: 1 } },
    )
    const long = "x".repeat(10_000)
    await reply(tried.message.id, "msg_t", long)
    expect(await client.drained(5000)).toBe(true)

    const completions = ofType(sent, "completion")
    expect(completions.map((m) => m.task)).toEqual(["run the payment tests"])
    const summary = completions[0]!.summary as string
    expect(summary.length).toBe(SUMMARY_CHARS)
    expect(summary).toBe(`${long.slice(0, SUMMARY_CHARS - 1)}…`)
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.filter((e) => e.metadata.type === "success").map((e) => e.body)).toEqual([
      "Completed: run the payment tests",
    ])
    expect(episodes.every((e) => e.metadata.session === "ses_1")).toBe(true)
  })

  test("a file a sub-agent writes makes its parent's turn a task too", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url)
    const t0 = 1_790_000_000_000
    const turn = await chat(hooks, "ses_main", "refactor the cart with a helper")
    const child = {
      id: "ses_child",
      parentID: "ses_main",
      projectID: "p",
      directory: "/work/shop",
      title: "helper",
      version: "1",
      time: { created: t0, updated: t0 },
    }
    await hooks.event!({ event: { type: "session.created", properties: { info: child } } })
    await writeFile(hooks, "ses_child", "w", "src/cart.ts")
    const parentID = turn.message.id
    await hooks.event!(assistant({ id: "msg_m", sessionID: "ses_main", parentID, time: { created: t0 } }))
    await hooks.event!(textPart("ses_main", "msg_m", "prt_m", "The helper refactored the cart."))
    await hooks.event!(
      assistant({
        id: "msg_m",
        sessionID: "ses_main",
        parentID,
        time: { created: t0, completed: t0 + 5 },
        finish: "stop",
      }),
    )
    expect(await client.drained(5000)).toBe(true)
    expect(ofType(sent, "file:write").map((m) => m.session)).toEqual(["ses_child"])
    expect(ofType(sent, "completion")).toMatchObject([
      {
        task: "refactor the cart with a helper",
        summary: "The helper refactored the cart.",
        session: "ses_main",
      },
    ])
  })

  test("a chat waits for the events of earlier turns before it asks, so they reach the bridge first", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, client, sent } = hooksFor(bridge.url, { deadlineMs: 5000 })
    expect(await client.opened(5000)).toBe(true)
    const backlogs: number[] = []
    const request = client.request.bind(client)
    client.request = (message, deadlineMs) => {
      backlogs.push(client.backlog)
      return request(message, deadlineMs)
    }
    await chat(hooks, "ses_1", "split the parser")
    const files = ["a", "b", "c", "d", "e", "f"].map((name) => `/work/shop/src/${name}.ts`)
    for (const file of files) await hooks.event!(fileEdited(file))
    expect(client.backlog).toBeGreaterThan(0)
    await chat(hooks, "ses_1", "now document it")
    // Each chat:start went out with nothing left to acknowledge before it.
    expect(backlogs).toEqual([0, 0])
    expect(sent.map((m) => m.type)).toEqual([
      "chat:start",
      ...files.map(() => "file:write" as const),
      "chat:start",
    ])
  })

  test("replies are matched to requests by id", async () => {
    const bridge = await cleanups.bridge()
    const words = ["zebra", "walrus", "pelican", "ocelot", "marmot", "lemur", "kestrel", "jackal"]
    await ask(
      bridge.url,
      words.map((word, i) => ({
        type: "error",
        id: i,
        project: "zoo",
        message: `${word} escaped its enclosure`,
      })),
    )
    const { log } = capture()
    const client = new BridgeClient({ url: bridge.url, maxQueue: 10, log })
    cleanups.push(() => client.close())
    client.start()
    const replies = await Promise.all(
      words.flatMap((word) =>
        [1, 2, 3].map(() => client.request({ type: "query", project: "zoo", query: word, limit: 1 }, 5000)),
      ),
    )
    replies.forEach((reply, i) => {
      expect(reply?.type).toBe("result")
      if (reply?.type !== "result") return
      expect(reply.episodes[0]!.body).toBe(`Error: ${words[Math.floor(i / 3)]} escaped its enclosure`)
    })
  })

  test("the Plugin reads the environment; the token goes in the handshake header, never in the URL", async () => {
    const token = "t0ken-xyz"
    const bridge = await cleanups.bridge({ args: ["--log-level", "debug"], env: { BRIDGE_TOKEN: token } })
    const seed = { type: "error", id: 1, project: "from-env", message: "gateway timeout in the billing job" }
    expect((await ask(bridge.url, [seed], { token }))[0].ok).toBe(true)
    const queueDir = cleanups.scratchDir("gb-plugin-queue")
    const saved = { ...process.env }
    cleanups.push(() => {
      for (const key of Object.keys(process.env))
        if (key.startsWith("GRAPHITI_BRIDGE_")) delete process.env[key]
      Object.assign(process.env, saved)
    })
    Object.assign(process.env, {
      GRAPHITI_BRIDGE_URL: bridge.url,
      GRAPHITI_BRIDGE_TOKEN: token,
      GRAPHITI_BRIDGE_PROJECT: "from-env",
      GRAPHITI_BRIDGE_DEADLINE_MS: "2000",
      GRAPHITI_BRIDGE_QUEUE_DIR: queueDir,
    })
    const input = { ...WORKTREE, client: undefined } as unknown as PluginInput
    const hooks = await GraphitiMemoryPlugin(input)
    cleanups.push(() => hooks.dispose?.())

    // The bridge admits only handshakes that carry the token: memory comes back.
    const turn = await chat(hooks as any, "ses_1", "why did the billing job fail?")
    expect(await memoryAfter(hooks as any, turn)).toContain("gateway timeout in the billing job")

    // Without it, or with a wrong one, the bridge refuses the handshake: chats go on without
    // memory, and the plugin says what is wrong once, as a token problem, not on every retry.
    for (const [wrong, why] of [
      [undefined, "GRAPHITI_BRIDGE_TOKEN is not set, and the bridge wants one"],
      ["not-the-token", "GRAPHITI_BRIDGE_TOKEN is not the bridge's BRIDGE_TOKEN"],
    ] as const) {
      const {
        hooks: refused,
        client,
        lines,
      } = hooksFor(bridge.url, { token: wrong, project: "from-env", deadlineMs: 2000 })
      const turn = await chat(refused, "ses_1", "why did the billing job fail?")
      expect(await memoryAfter(refused, turn)).toBeUndefined()
      const told = (): string[] => lines.filter((line) => line.includes("refused the token"))
      expect(await until(() => client.stats.attempts >= 4 && told().length > 0, 10_000)).toBe(true)
      expect(told()).toEqual([
        `error the bridge at ${bridge.url} refused the token: ${why}; ` +
          "chats go on without memory and events wait in the queue until it matches",
      ])
      expect(lines.filter((line) => line.includes("cannot connect"))).toEqual([])
      expect(client.stats.connects).toBe(0)
    }
    // The bridge logged the refusals (once a minute at most), without the token.
    expect(bridge.stderr).toContain("refused a handshake from 127.0.0.1: HTTP 401, missing or wrong token")
    expect(bridge.stderr).not.toContain("not-the-token")

    // The bridge's debug log shows every request line it received: none holds the token.
    await until(() => (bridge.stderr.match(/ < GET \S+ HTTP\/1\.1$/gm) ?? []).length >= 2, 5000)
    const requestLines = bridge.stderr.match(/ < GET \S+ HTTP\/1\.1$/gm) ?? []
    expect(requestLines.length).toBeGreaterThanOrEqual(2)
    for (const line of requestLines) expect(line).not.toContain(token)
  })

  test("events the bridge refuses as retryable (its rate limit) are sent again, in order", async () => {
    const bridge = await cleanups.bridge({ args: ["--rate-limit", "20", "--rate-burst", "1"] })
    const { hooks, client, lines } = hooksFor(bridge.url)
    expect(await client.opened(5000)).toBe(true)
    const files = ["a", "b", "c", "d", "e"].map((name) => `/work/shop/${name}.ts`)
    for (const file of files) await hooks.event!(fileEdited(file))
    expect(await client.drained(10_000)).toBe(true)
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual(files.map((file) => `Modified: ${file}`))
    expect(client.stats.retried).toBeGreaterThan(0)
    expect(client.stats).toMatchObject({ acked: 5, refused: 0, dropped: 0 })
    expect(lines.filter((line) => line.startsWith("error"))).toEqual([])
  })
})

// -- when the bridge is slow, down or absent ---------------------------------------------

describe("without a working bridge", () => {
  test("while no bridge listens, chats go on without memory at once (fast-fail); once it is back they get memory", async () => {
    const port = await freePort()
    const { hooks, client, lines } = hooksFor(`ws://127.0.0.1:${port}`, { deadlineMs: 10_000 })
    const down = (): string[] => lines.filter((line) => line.includes("cannot connect to the bridge"))
    expect(await until(() => down().length > 0, 5000)).toBe(true)
    for (const [session, text] of [
      ["ses_1", "what broke?"],
      ["ses_2", "and now?"],
    ] as const) {
      const turn = await chat(hooks, session, text)
      expect(turn.parts).toEqual(turn.before)
      expect(await memoryAfter(hooks, turn)).toBeUndefined()
    }
    // Neither chat waited for its (long) deadline: both were answered with nothing at once.
    expect(client.stats.fastFailed).toBe(2)
    expect(lines.filter((line) => line.includes("fast-fail")).length).toBe(1)
    expect(down().length).toBe(1)
    expect(lines.filter((line) => line.startsWith("error"))).toEqual([])

    const bridge = await cleanups.bridge({ port })
    await ask(bridge.url, [{ type: "error", id: 1, project: "shop", message: "segfault in the renderer" }])
    expect(await until(() => client.connected, 30_000)).toBe(true)
    // A session whose first chat went without memory asks again with its next one.
    const turn = await chat(hooks, "ses_1", "what about the renderer segfault?")
    expect(await memoryAfter(hooks, turn)).toContain("segfault in the renderer")
    expect(client.stats.fastFailed).toBe(2)
  })

  test("when the bridge hangs, the chat hook gives up at its deadline", async () => {
    const bridge = await cleanups.bridge()
    await ask(bridge.url, [{ type: "error", id: 1, project: "shop", message: "deadlock in the scheduler" }])
    const { hooks, client } = hooksFor(bridge.url, { deadlineMs: 250 })
    expect(await client.opened(5000)).toBe(true)
    bridge.pause()
    try {
      const turn = await chat(hooks, "ses_1", "what about the scheduler deadlock?")
      expect(await memoryAfter(hooks, turn)).toBeUndefined()
      // Not known to be down (the connection is open): it waited, and got nothing.
      expect(client.stats.fastFailed).toBe(0)
    } finally {
      bridge.resume()
    }
    const turn = await chat(hooks, "ses_1", "what about the scheduler deadlock?")
    expect(await memoryAfter(hooks, turn)).toContain("deadlock in the scheduler")
  })

  test("killed mid-session: chats go on without memory, events queue and arrive in order after it returns", async () => {
    const dataDir = cleanups.scratchDir("gb-plugin-data")
    const first = await cleanups.bridge({ dataDir })
    const { hooks, client, lines } = hooksFor(first.url, { deadlineMs: 300 })
    expect(await client.opened(5000)).toBe(true)
    await hooks.event!(fileEdited("/work/shop/a.ts"))
    expect(await client.drained(5000)).toBe(true)

    await first.kill()
    expect(await until(() => !client.connected, 5000)).toBe(true)
    const turn = await chat(hooks, "ses_1", "what changed in a.ts?")
    expect(await memoryAfter(hooks, turn)).toBeUndefined()
    expect(client.stats.fastFailed).toBe(1)

    const edits = ["/work/shop/b.ts", "/work/shop/c.ts", "/work/shop/d.ts"]
    for (const file of edits) await hooks.event!(fileEdited(file))
    await hooks.event!({
      event: {
        type: "session.error",
        properties: { error: { name: "UnknownError", data: { message: "disk full" } } },
      },
    })
    expect(client.backlog).toBe(4)

    const second = await cleanups.bridge({ dataDir, port: first.port })
    expect(await client.drained(10_000)).toBe(true)
    const episodes = await exportEpisodes(second.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual([
      "Modified: /work/shop/a.ts",
      ...edits.map((file) => `Modified: ${file}`),
      "Error: UnknownError: disk full",
    ])
    expect(client.stats).toMatchObject({ acked: 5, dropped: 0, refused: 0, retried: 0, connects: 2 })
    expect(lines.some((line) => line.includes("reconnecting"))).toBe(true)

    const after = await chat(hooks, "ses_1", "what changed in c.ts?")
    expect(await memoryAfter(hooks, after)).toContain("/work/shop/c.ts")
  })

  test("a full queue drops its oldest events, counts and logs it, and never throws", async () => {
    const port = await freePort()
    const { hooks, client, lines } = hooksFor(`ws://127.0.0.1:${port}`, { maxQueue: 3 })
    const files = ["1", "2", "3", "4", "5"].map((n) => `/work/shop/f${n}.ts`)
    for (const file of files) await hooks.event!(fileEdited(file))
    expect(client.stats.dropped).toBe(2)
    expect(client.backlog).toBe(3)
    expect(lines.filter((line) => line.includes("queue full")).length).toBe(1)

    const bridge = await cleanups.bridge({ port })
    expect(await client.drained(10_000)).toBe(true)
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual(files.slice(2).map((file) => `Modified: ${file}`))
    expect(lines.some((line) => line.includes("2 events were dropped"))).toBe(true)
  })

  test("events outlive OpenCode: queued on disk while the bridge is down, sent once after a restart, in order", async () => {
    const port = await freePort()
    const url = `ws://127.0.0.1:${port}`
    const queueDir = cleanups.scratchDir("gb-plugin-queue")
    const files = ["a", "b", "c", "d"].map((name) => `/work/shop/src/${name}.ts`)

    // OpenCode runs while the bridge is down, then stops: its events stay on disk.
    const before = hooksFor(url, { queueDir })
    for (const file of files) await before.hooks.event!(fileEdited(file))
    const queued = ofType(before.sent, "file:write")
    expect(queued.length).toBe(before.sent.length)
    await before.hooks.dispose!()
    const [file] = readdirSync(queueDir)
    const copy = readFileSync(join(queueDir, file!), "utf8")
    expect(copy.trim().split("\n").length).toBe(files.length)

    // The bridge starts, OpenCode again: the events go out first, as they were stamped,
    // before the first chat asks (which comes while the plugin is still connecting).
    const bridge = await cleanups.bridge({ port })
    const after = hooksFor(url, { queueDir, deadlineMs: 10_000 })
    expect(after.client.stats.recovered).toBe(files.length)
    expect(after.client.connected).toBe(false)
    const turn = await chat(after.hooks, "ses_2", "what changed in src/c.ts?")
    expect(after.client.backlog).toBe(0)
    expect(await memoryAfter(after.hooks, turn)).toContain("/work/shop/src/c.ts")
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual(files.map((path) => `Modified: ${path}`))
    const stamped = copy
      .trim()
      .split("\n")
      .map((line) => JSON.parse(line).event)
    expect(stamped.map((event) => event.path)).toEqual(queued.map((message) => message.path))
    expect(episodes.map((e) => e.reference_time)).toEqual(stamped.map((event) => event.at))
    // Nothing is left to send: the file is gone once the plugin closes.
    await after.hooks.dispose!()
    expect(readdirSync(queueDir)).toEqual([])

    // A replay of events the bridge already stored (the acks were lost in a crash, say):
    // the bridge keeps each once.
    writeFileSync(join(queueDir, file!), copy)
    const again = hooksFor(url, { queueDir })
    expect(again.client.stats.recovered).toBe(files.length)
    expect(await again.client.drained(10_000)).toBe(true)
    expect(again.client.stats.acked).toBe(files.length)
    const once = await exportEpisodes(bridge.url, "shop")
    expect(once.map((e) => e.body)).toEqual(files.map((path) => `Modified: ${path}`))
  })
})

describe("hooks never throw into OpenCode", () => {
  test("malformed input is caught and logged with the Memory plugin error prefix", async () => {
    const bridge = await cleanups.bridge()
    const { hooks, lines } = hooksFor(bridge.url)
    const calls: Array<() => Promise<unknown>> = [
      () => hooks["chat.message"]!({ sessionID: "ses_1" }, {} as any),
      () => hooks["chat.message"]!(undefined as any, undefined as any),
      () => hooks.event!(undefined as any),
      () => hooks.event!({ event: { type: "file.edited" } } as any),
      () => hooks.event!({ event: { type: "message.updated", properties: {} } } as any),
      () =>
        hooks.event!({
          event: { type: "message.updated", properties: { info: { role: "assistant", time: null } } },
        } as any),
      () => hooks["tool.execute.before"]!(undefined as any, undefined as any),
      () =>
        hooks["tool.execute.after"]!({ tool: "bash", sessionID: "s", callID: "c" } as any, undefined as any),
      () => hooks["tool.execute.after"]!(undefined as any, { metadata: { exit: 1 } } as any),
      () => hooks.event!({ event: { type: "message.part.updated", properties: {} } } as any),
      () =>
        hooks.event!({
          event: { type: "message.part.updated", properties: { part: { type: "tool", state: null } } },
        } as any),
      () => hooks.event!({ event: { type: "session.status", properties: { sessionID: 5 } } } as any),
      () => hooks.event!({ event: { type: "session.created", properties: { info: null } } } as any),
    ]
    for (const call of calls) await call() // resolves; a throw would fail the test
    const errors = lines.filter((line) => line.startsWith("error"))
    expect(errors.length).toBeGreaterThanOrEqual(2)
    for (const line of errors) expect(line).toContain(`${ERROR_PREFIX}`)
  })

  test("a logger that throws does not escape either", async () => {
    const throwing: Logger = () => {
      throw new Error("logger down")
    }
    const made = createHooks(WORKTREE, {
      url: `ws://127.0.0.1:${await freePort()}`,
      deadlineMs: 50,
      maxQueue: 1,
      log: throwing,
    })
    cleanups.push(() => made.hooks.dispose?.())
    await made.hooks["chat.message"]!({ sessionID: "s" }, {} as any)
    await made.hooks.event!(fileEdited("/x"))
    await made.hooks.event!(fileEdited("/y"))
    await made.hooks.dispose!()
    await made.hooks.dispose!()
  })
})
