/**
 * The agent's `memory` tool: search memory, save a note, forget (the bridge's `query`,
 * `note` and `forget` messages, docs/protocol.md).
 *
 * A search returns the memory context a new chat would get for the query (ranked files and
 * past tasks) and the matching episodes with their ids; it opens no task. A note is an
 * event like a file written: it goes through the ordered queue on disk, so a note saved
 * while the bridge is away is stored once it is back. A forget waits until the events
 * queued before it have reached the bridge, so it never misses what the session just did.
 * Whatever goes wrong comes back to the model as the tool's error, in words it can act on.
 */
import type { ToolContext, ToolDefinition } from "@opencode-ai/plugin"
import { isAbsolute, resolve } from "node:path"
import { z } from "zod"
import type { BridgeClient } from "./client.ts"
import { type Ack, BOUNDS, type Forget, type QueryResult } from "./protocol.ts"
import type { Outgoing, Reply } from "./wire.ts"

export const MEMORY_TOOL = "memory"
/** Longest wait for the bridge's answer in one call of the tool. */
export const TOOL_DEADLINE_MS = 10_000
/** Longest wait for the events queued before a search or a forget to reach the bridge. */
const DRAIN_MS = 5_000
/** Longest search and longest note the protocol accepts. */
const MAX_QUERY = BOUNDS.query.query.maxLength
const MAX_NOTE = BOUNDS.note.text.maxLength
const EPISODES_SHOWN = 5
const BODY_CHARS = 300
/** What the model may write for the session it is in. */
const THIS_SESSION = new Set(["this", "this session", "current", "current session"])

export type MemoryClient = Pick<BridgeClient, "request" | "send" | "drained" | "unreachable" | "backlog">

export interface MemoryToolOptions {
  client: MemoryClient
  project: string
  /** The bridge's URL, for error texts. */
  url: string
  /** Relative paths are resolved against the call's directory, else this one. */
  directory: string
  deadlineMs?: number
  /** A session's memory was forgotten: what its current turn did so far is no task now. */
  onSessionForgotten?: (sessionID: string) => void
}

export const DESCRIPTION = `Long-term memory of this project, shared by all sessions: past tasks (the prompt, the files written, the errors hit, the outcome) and notes saved on purpose. A summary of what memory holds for the user's first message is already at the start of the chat; use this tool for more, or for something specific.

Actions:
- search (query): look up what memory knows, e.g. how a past task was done, what broke before and why, which files a change usually touches, or a convention a note recorded. Returns the ranked memory context for the query and the matching episodes with their ids.
- save (text): remember a fact for later sessions, when the user asks ("remember that…", "note for next time…", "from now on…") or when you learned something worth keeping (a decision, a pitfall, a command that works). One self-contained statement; never secrets.
- forget (exactly one of episode, path, session): when the user wants something out of memory ("forget that", "forget what you know about config.py", "forget this session"). episode: an id a search listed; path: every memory of that file; session: a session id, or "this" for the current session. Says how many episodes were forgotten; a forget cannot be undone.`

type Args = {
  action: "search" | "save" | "forget"
  query?: string
  text?: string
  episode?: string
  path?: string
  session?: string
}

type Result = { title: string; output: string }

/** The kinds of forget the tool offers (a task is forgotten from the memory page). */
type ForgetKind = "episode" | "path" | "session"

function clip(text: string, limit: number): string {
  const flat = text.replace(/\s+/g, " ").trim()
  return flat.length <= limit ? flat : `${flat.slice(0, limit - 1)}…`
}

function plural(count: number, word: string): string {
  return `${count} ${word}${count === 1 ? "" : "s"}`
}

/** The bridge's reason for a refusal, from an ok:false ack. */
function refusal(ack: Ack): string {
  const error = ack.error
  const message = typeof error?.message === "string" ? error.message : "no reason given"
  return typeof error?.code === "string" ? `${message} (${error.code})` : message
}

/** The search's answer, as the model reads it: the context, then the episodes with ids. */
export function searchOutput(query: string, reply: Omit<QueryResult, "id">): string {
  const context = typeof reply.context === "string" && reply.context ? reply.context : null
  const episodes = Array.isArray(reply.episodes) ? reply.episodes : []
  const lines = [context ?? `Memory holds nothing for "${clip(query, 200)}".`]
  if (episodes.length) {
    lines.push("", "Matching episodes, best first (an id can be given to forget one):")
    for (const episode of episodes.slice(0, EPISODES_SHOWN)) {
      const at = typeof episode.reference_time === "number" ? episode.reference_time : NaN
      const day = Number.isFinite(at) ? new Date(at * 1000).toISOString().slice(0, 10) : "?"
      lines.push(`- ${String(episode.uuid)} (${day}) ${clip(String(episode.body ?? ""), BODY_CHARS)}`)
    }
  }
  return lines.join("\n")
}

/** What a forget did, as the model reads it. */
export function forgetOutput(kind: ForgetKind, value: string, forgotten: number, sessionID: string): string {
  const what = kind === "session" && value === sessionID ? "this session" : `${kind} ${value}`
  if (!forgotten) return `Memory held nothing for ${what}; nothing was forgotten.`
  const gone = `no later search or chat recalls ${forgotten === 1 ? "it" : "them"}`
  if (kind === "episode") return `Forgot episode ${value}; ${gone}.`
  return `Forgot ${plural(forgotten, "episode")} of ${what}; ${gone}.`
}

/** The one forget selector the call gives, or an error naming what is wrong. */
export function forgetSelector(args: Args, sessionID: string): { kind: ForgetKind; value: string } {
  const given = (["episode", "path", "session"] as const)
    .map((kind: ForgetKind) => ({ kind, value: args[kind]?.trim() ?? "" }))
    .filter(({ value }) => value)
  if (given.length !== 1) {
    const got = given.length ? given.map(({ kind }) => `\`${kind}\``).join(" and ") : "none"
    throw new Error(
      `forget needs exactly one of \`episode\` (an id a search listed), \`path\` (a file) or ` +
        `\`session\` (a session id, or "this"); got ${got}`,
    )
  }
  const chosen = given[0]!
  if (chosen.kind === "session" && THIS_SESSION.has(chosen.value.toLowerCase())) {
    return { kind: "session", value: sessionID }
  }
  return chosen
}

/** A forget message of one selector. */
function forgetMessage(kind: ForgetKind, value: string, project: string): Omit<Forget, "id"> {
  switch (kind) {
    case "episode":
      return { type: "forget", episode: value, project }
    case "path":
      return { type: "forget", path: value, project }
    case "session":
      return { type: "forget", session: value, project }
  }
}

/** The `memory` tool over a bridge client. */
export function memoryTool(options: MemoryToolOptions): ToolDefinition {
  const { client, project, url } = options
  const deadlineMs = options.deadlineMs ?? TOOL_DEADLINE_MS
  const unreachable = `the memory bridge at ${url} is unreachable (is graphiti-bridge running?)`

  /** A request's reply, or an error saying why there is none or what the bridge refused. */
  const ask = async (message: Outgoing, undone: string): Promise<Reply> => {
    const reply = await client.request(message, deadlineMs)
    if (!reply) {
      throw new Error(
        client.unreachable
          ? `${unreachable}; ${undone}`
          : `the memory bridge at ${url} did not answer within ${deadlineMs / 1000} s; ${undone}`,
      )
    }
    if (reply.type === "ack" && reply.ok === false) {
      throw new Error(`the memory bridge refused the ${message.type}: ${refusal(reply)}`)
    }
    return reply
  }

  const search = async (args: Args): Promise<Result> => {
    const query = args.query?.trim() ?? ""
    if (!query) throw new Error("search needs `query`: what to look up, in words")
    // What this session did last is searched too once it reached the bridge.
    if (client.backlog) await client.drained(DRAIN_MS, true)
    const reply = await ask(
      { type: "query", query: query.slice(0, MAX_QUERY), limit: EPISODES_SHOWN, project },
      "nothing was searched",
    )
    if (reply.type !== "result") {
      throw new Error(`the memory bridge answered a search with a ${reply.type} message`)
    }
    return { title: `search: ${clip(query, 60)}`, output: searchOutput(query, reply) }
  }

  const save = async (args: Args, context: ToolContext): Promise<Result> => {
    const text = args.text?.trim() ?? ""
    if (!text) throw new Error("save needs `text`: the note to remember")
    if (text.length > MAX_NOTE) {
      throw new Error(`the note is ${text.length} characters long; at most ${MAX_NOTE} fit`)
    }
    const note = { type: "note", text, project, session: context.sessionID } as const
    const outcome = await new Promise<Ack | "dropped" | "waiting">((done) => {
      const timer = setTimeout(() => done("waiting"), client.unreachable ? 0 : deadlineMs)
      client.send(note, (reply) => {
        clearTimeout(timer)
        done(reply ?? "dropped")
      })
    })
    const title = `save: ${clip(text, 60)}`
    if (outcome === "dropped") {
      throw new Error("the note was not saved: the plugin's event queue is full or closed")
    }
    if (outcome === "waiting") {
      const why = client.unreachable
        ? `${unreachable} now`
        : `the memory bridge at ${url} has not confirmed it within ${deadlineMs / 1000} s`
      return {
        title,
        output: `Not in memory yet: ${why}. The note waits in the plugin's queue on disk and is saved once the bridge takes it.`,
      }
    }
    if (outcome.ok === false) throw new Error(`the memory bridge did not save the note: ${refusal(outcome)}`)
    return {
      title,
      output:
        `Saved to memory as episode ${String(outcome.episode)}; later chats in this project recall it` +
        `${outcome.queued === true ? " (the bridge keeps it in its outbox until its store takes it)" : ""}: ` +
        `"${clip(text, 200)}"`,
    }
  }

  const forget = async (args: Args, context: ToolContext): Promise<Result> => {
    const { kind, value } = forgetSelector(args, context.sessionID)
    // Events queued before the forget must reach the bridge first, or they would outlive it.
    if (client.backlog && !(await client.drained(DRAIN_MS, true))) {
      throw new Error(
        client.unreachable
          ? `${unreachable}; nothing was forgotten`
          : `${plural(client.backlog, "event")} still wait to reach the memory bridge; nothing ` +
              "was forgotten, so that none of them outlives the forget: try again shortly",
      )
    }
    // Memory holds a file as OpenCode named it (absolute): a relative path is tried as given
    // and resolved against the session's folder.
    const values =
      kind === "path" && !isAbsolute(value)
        ? [value, resolve(context.directory || options.directory, value)]
        : [value]
    let forgotten = 0
    for (const one of values) {
      const undone = forgotten
        ? `only the ${plural(forgotten, "episode")} of ${values[0]} ${forgotten === 1 ? "was" : "were"} forgotten`
        : "nothing was forgotten"
      const reply = await ask(forgetMessage(kind, one, project), undone)
      forgotten += reply.type === "ack" && typeof reply.forgotten === "number" ? reply.forgotten : 0
    }
    if (kind === "session") options.onSessionForgotten?.(value)
    return {
      title: `forget: ${kind} ${clip(value, 60)}`,
      output: forgetOutput(kind, values.at(-1)!, forgotten, context.sessionID),
    }
  }

  return {
    description: DESCRIPTION,
    args: {
      action: z.enum(["search", "save", "forget"]).describe("what to do: search, save or forget"),
      query: z.string().optional().describe("search: what to look up, in words"),
      text: z.string().optional().describe("save: the note, one self-contained statement"),
      episode: z.string().optional().describe("forget: the id of one episode, as a search lists it"),
      path: z.string().optional().describe("forget: a file; every memory of it is forgotten"),
      session: z.string().optional().describe('forget: a session id, or "this" for the current session'),
    },
    async execute(args: Args, context: ToolContext): Promise<Result> {
      switch (args.action) {
        case "search":
          return await search(args)
        case "save":
          return await save(args, context)
        case "forget":
          return await forget(args, context)
        default:
          throw new Error(`unknown action ${JSON.stringify(args.action)}: use search, save or forget`)
      }
    },
  }
}
