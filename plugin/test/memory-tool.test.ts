/**
 * The `memory` tool (search, save, forget) against a real bridge process, called the way
 * OpenCode calls a plugin's tool: its `execute` with the arguments and a tool context.
 */
import type { ToolContext } from "@opencode-ai/plugin"
import type { AssistantMessage, Event, TextPart } from "@opencode-ai/sdk"
import { describe, expect, setDefaultTimeout, test } from "bun:test"
import { type HookOptions, MEMORY_TOOL } from "../graphiti-memory.ts"
import { DESCRIPTION, searchOutput } from "../lib/memory-tool.ts"
import { ask, Cleanups, exportEpisodes, freePort, until } from "./bridge.ts"
import { promptMessage, recordedHooks, WORKTREE } from "./hooks.ts"

setDefaultTimeout(60_000)

const cleanups = new Cleanups()

const SHOP = WORKTREE.directory

function hooksFor(url: string, options: Partial<HookOptions> = {}) {
  return recordedHooks(cleanups, url, { deadlineMs: 2000, ...options })
}

type Hooked = ReturnType<typeof hooksFor>

function context(sessionID: string): ToolContext {
  return {
    sessionID,
    messageID: "msg_tool",
    agent: "build",
    directory: SHOP,
    worktree: SHOP,
    abort: new AbortController().signal,
    metadata: () => {},
    ask: async () => {},
  }
}

/** Call the memory tool as OpenCode does; the text the model reads. */
async function memory(made: Hooked, sessionID: string, args: Record<string, string>): Promise<string> {
  const tool = made.hooks.tool?.[MEMORY_TOOL]
  if (!tool) throw new Error("the plugin registers no memory tool")
  const result = await tool.execute(args as never, context(sessionID))
  return typeof result === "string" ? result : result.output
}

/** A tool call of `sessionID` that writes `file`, then OpenCode's file.edited event. */
async function writes(made: Hooked, sessionID: string, file: string): Promise<void> {
  const callID = `call_${file}`
  await made.hooks["tool.execute.before"]!({ tool: "write", sessionID, callID }, { args: { filePath: file } })
  const event: Event = { type: "file.edited", properties: { file } }
  await made.hooks.event!({ event })
}

/** The chat hook for a session's first prompt; the memory its chats carry. */
async function chatMemory(made: Hooked, sessionID: string, text: string): Promise<string | undefined> {
  const messageID = `msg_${sessionID}`
  const part: TextPart = { id: `prt_${sessionID}`, sessionID, messageID, type: "text", text }
  const message = promptMessage(sessionID, messageID)
  await made.hooks["chat.message"]!({ sessionID, messageID }, { message, parts: [part] })
  const messages = [{ info: message, parts: [part] }]
  await made.hooks["experimental.chat.messages.transform"]!({}, { messages })
  return messages
    .flatMap((m) => m.parts)
    .map((p) => (p.type === "text" ? p.text : ""))
    .find((text) => text.startsWith("[Memory Context]"))
}

/** The assistant's final answer of a turn (the message.updated that ends it). */
function answered(sessionID: string, parentID: string): Event {
  const info: AssistantMessage = {
    id: `msg_${sessionID}_answer`,
    sessionID,
    parentID,
    role: "assistant",
    modelID: "stub",
    providerID: "local",
    mode: "build",
    path: { cwd: SHOP, root: SHOP },
    cost: 0,
    tokens: { input: 10, output: 5, reasoning: 0, cache: { read: 0, write: 0 } },
    time: { created: Date.now() - 100, completed: Date.now() },
    finish: "stop",
  }
  return { type: "message.updated", properties: { info } }
}

describe("the memory tool", () => {
  test("is described to the model with when to use each action", () => {
    for (const phrase of [
      "search",
      "save",
      "forget",
      "forget that",
      "forget this session",
      "how a past task was done",
    ]) {
      expect(DESCRIPTION).toContain(phrase)
    }
    expect(searchOutput("pumps", { type: "result", episodes: [], context: null })).toBe(
      'Memory holds nothing for "pumps".',
    )
  })

  test("search returns the context a new chat gets for the query, and the episodes with their ids", async () => {
    const bridge = await cleanups.bridge()
    const prime = `${SHOP}/src/pump/prime.py`
    const seeded = await ask(`${bridge.url}/shop`, [
      { type: "chat:start", id: 1, query: "prime the coolant pump", session: "seed" },
      { type: "file:write", id: 2, path: prime, session: "seed" },
    ])
    expect(seeded.map((reply) => reply.type).sort()).toEqual(["ack", "context"])
    const made = hooksFor(bridge.url)

    const found = await memory(made, "ses_a", { action: "search", query: "coolant pump priming" })
    const [context, listed] = found.split(
      "\n\nMatching episodes, best first (an id can be given to forget one):\n",
    )
    expect(context).toStartWith("[Memory Context] ")
    expect(context).toContain(prime)
    expect(context).toContain('"prime the coolant pump"')
    const [episode] = await exportEpisodes(bridge.url, "shop")
    expect(listed).toStartWith(`- ${episode.uuid} (`)
    expect(listed).toContain(`Modified: ${prime}`)
    // The same text a new session's chat carries for the same words.
    expect(await chatMemory(made, "ses_b", "coolant pump priming")).toBe(context)
    const empty = hooksFor(bridge.url, { project: "empty" })
    expect(await memory(empty, "ses_a", { action: "search", query: "coolant pump" })).toBe(
      'Memory holds nothing for "coolant pump".',
    )
  })

  test("save stores a note the next chat recalls; forget by episode, by path and this session says how many went", async () => {
    const bridge = await cleanups.bridge()
    const made = hooksFor(bridge.url)
    const note = "The coolant pump must be primed with the valve half open."

    const saved = await memory(made, "ses_n", { action: "save", text: note })
    const id = /^Saved to memory as episode ([0-9a-f]{32}); later chats in this project recall it: "/.exec(
      saved,
    )?.[1]
    expect(id).toBeDefined()
    expect(saved).toContain(note)
    let episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => [e.uuid, e.body, e.metadata.session])).toEqual([
      [id, `Note: ${note}`, "ses_n"],
    ])
    const recalled = await chatMemory(made, "ses_later", "how do I prime the coolant pump?")
    expect(recalled).toContain(note)

    expect(await memory(made, "ses_n", { action: "forget", episode: id! })).toBe(
      `Forgot episode ${id}; no later search or chat recalls it.`,
    )
    expect(await exportEpisodes(bridge.url, "shop")).toEqual([])

    // Written and forgotten at once: the forget waits for the write to reach the bridge.
    // A relative path is the file of the session's folder, as OpenCode names it.
    await writes(made, "ses_m", `${SHOP}/src/valve.py`)
    expect(await memory(made, "ses_m", { action: "forget", path: "src/valve.py" })).toBe(
      `Forgot 1 episode of path ${SHOP}/src/valve.py; no later search or chat recalls it.`,
    )
    expect(await memory(made, "ses_m", { action: "forget", path: "src/valve.py" })).toBe(
      `Memory held nothing for path ${SHOP}/src/valve.py; nothing was forgotten.`,
    )

    // A turn of ses_m writes a file and saves a note, then the user has the session forgotten:
    // both go, and the turn, whose work is forgotten, ends without a completion.
    await chatMemory(made, "ses_m", "add a pressure gauge")
    await writes(made, "ses_m", `${SHOP}/src/gauge.py`)
    await memory(made, "ses_m", { action: "save", text: "The gauge reads in kPa." })
    await writes(made, "ses_other", `${SHOP}/src/other.py`)
    expect(await memory(made, "ses_m", { action: "forget", session: "this session" })).toBe(
      "Forgot 2 episodes of this session; no later search or chat recalls them.",
    )
    await made.hooks.event!({ event: answered("ses_m", "msg_ses_m") })
    expect(await made.client.drained(10_000)).toBe(true)
    expect(made.sent.filter((message) => message.type === "completion")).toEqual([])
    episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual([`Modified: ${SHOP}/src/other.py`])
  })

  test("a bad call or a refusal comes back as the tool's error, in words, and is no error event", async () => {
    const bridge = await cleanups.bridge()
    const made = hooksFor(bridge.url)
    const call = (args: Record<string, string>) => memory(made, "ses_e", args)

    await expect(call({ action: "search" })).rejects.toThrow(
      "search needs `query`: what to look up, in words",
    )
    await expect(call({ action: "save", text: "  " })).rejects.toThrow(
      "save needs `text`: the note to remember",
    )
    await expect(call({ action: "forget" })).rejects.toThrow(
      'forget needs exactly one of `episode` (an id a search listed), `path` (a file) or `session` (a session id, or "this"); got none',
    )
    await expect(call({ action: "forget", path: "a.py", session: "this" })).rejects.toThrow(
      "got `path` and `session`",
    )
    await expect(call({ action: "recall" })).rejects.toThrow(
      'unknown action "recall": use search, save or forget',
    )
    // The bridge's own refusal names the field.
    await expect(call({ action: "forget", episode: "e".repeat(300) })).rejects.toThrow(
      /^the memory bridge refused the forget: Expected `str` of length <= 256 - at `\$\.episode` \(bad_request\)$/,
    )
    const longest = "n".repeat(65_537)
    await expect(call({ action: "save", text: longest })).rejects.toThrow(
      "the note is 65537 characters long; at most 65536 fit",
    )

    // OpenCode shows the failed call as a tool part in state error: the plugin sends no error.
    const part = {
      id: "prt_mem",
      sessionID: "ses_e",
      messageID: "msg_e",
      type: "tool" as const,
      callID: "call_mem",
      tool: MEMORY_TOOL,
      state: {
        status: "error" as const,
        input: { action: "forget" },
        error: "forget needs exactly one of …",
        time: { start: 1, end: 2 },
      },
    }
    await made.hooks.event!({ event: { type: "message.part.updated", properties: { part } } })
    expect(made.sent.filter((message) => message.type === "error")).toEqual([])
    expect(await exportEpisodes(bridge.url, "shop")).toEqual([])
  })

  test("while the bridge is down a search says so at once, and a save waits in the queue until it is back", async () => {
    const port = await freePort()
    const url = `ws://127.0.0.1:${port}`
    const made = hooksFor(url)
    expect(await until(() => made.client.unreachable, 10_000)).toBe(true)

    await expect(memory(made, "ses_d", { action: "search", query: "pump" })).rejects.toThrow(
      `the memory bridge at ${url} is unreachable (is graphiti-bridge running?); nothing was searched`,
    )
    await expect(memory(made, "ses_d", { action: "forget", session: "this" })).rejects.toThrow(
      `the memory bridge at ${url} is unreachable (is graphiti-bridge running?); nothing was forgotten`,
    )
    const note = "Pump spares are in bay 4."
    expect(await memory(made, "ses_d", { action: "save", text: note })).toBe(
      `Not in memory yet: the memory bridge at ${url} is unreachable (is graphiti-bridge running?) now. ` +
        "The note waits in the plugin's queue on disk and is saved once the bridge takes it.",
    )

    const bridge = await cleanups.bridge({ port })
    expect(await made.client.drained(10_000)).toBe(true)
    const episodes = await exportEpisodes(bridge.url, "shop")
    expect(episodes.map((e) => e.body)).toEqual([`Note: ${note}`])
    expect(await memory(made, "ses_d", { action: "search", query: "pump spares" })).toContain(note)
  })
})
