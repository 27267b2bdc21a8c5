/**
 * The wire protocol's messages (docs/protocol.md), generated from the schema in
 * bridge/wire/protocol.py by scripts/protocol_ts.py: do not edit. After a change to the schema,
 * run `.venv/bin/python plugin/scripts/protocol_ts.py` from the repository's root.
 *
 * `ClientMessage` is what the plugin sends, `ServerMessage` what the bridge answers; both
 * are unions tagged by `type`. `BOUNDS` holds each client field's limits (string lengths
 * in characters, numbers inclusive), the ones the bridge enforces.
 */

/** The protocol's version, as `pong` reports it. */
export const PROTOCOL_VERSION = 1

/** A message to the bridge. */
export type ClientMessage =
  ChatStart | FileWrite | ErrorEvent | Completion | Query | Export | Ping | Note | Forget

/** A message from the bridge: the reply to a client message, matched by `id`. */
export type ServerMessage = Context | Ack | QueryResult | ExportChunk | ExportEnd | Pong

/**
 * The client messages that become episodes: they take `episode_id` and `at`, and are
 * answered with an `ack`.
 */
export type EpisodeMessage = FileWrite | ErrorEvent | Completion | Note

/** Each client message's `type`. */
export const CLIENT_TYPES = [
  "chat:start",
  "file:write",
  "error",
  "completion",
  "query",
  "export",
  "ping",
  "note",
  "forget",
] as const
/** Each server message's `type`. */
export const SERVER_TYPES = ["context", "ack", "result", "export:chunk", "export:end", "pong"] as const
/** The `type` of each episode message. */
export const EPISODE_TYPES = ["file:write", "error", "completion", "note"] as const

/** A string of `minLength` to `maxLength` characters. */
const chars = (minLength: number, maxLength: number) => ({ minLength, maxLength })

/** A number from `minimum` to `maximum`, both included. */
const span = (minimum: number, maximum: number) => ({ minimum, maximum })

/** The bounds of the fields of `ClientMessageFields`. */
const CLIENT_MESSAGE_BOUNDS = {
  id: { maxLength: 256 },
  project: chars(1, 256),
  session: chars(1, 256),
} as const

/** The bounds of the fields of `EpisodeMessageFields`. */
const EPISODE_MESSAGE_BOUNDS = {
  ...CLIENT_MESSAGE_BOUNDS,
  episode_id: chars(1, 256),
  at: span(0, 100000000000),
} as const

/** The bounds of each client message's fields, by message type and field. */
export const BOUNDS = {
  "chat:start": { query: { maxLength: 65536 }, ...CLIENT_MESSAGE_BOUNDS },
  "file:write": { path: chars(1, 4096), ...EPISODE_MESSAGE_BOUNDS },
  error: { message: chars(1, 65536), ...EPISODE_MESSAGE_BOUNDS },
  completion: {
    task: chars(1, 65536),
    duration_ms: span(0, 100000000000000),
    tokens: span(0, 9007199254740992),
    ...EPISODE_MESSAGE_BOUNDS,
  },
  query: { query: { maxLength: 65536 }, limit: span(1, 100), ...CLIENT_MESSAGE_BOUNDS },
  export: { chunk_size: span(1, 1000), ...CLIENT_MESSAGE_BOUNDS },
  ping: { ...CLIENT_MESSAGE_BOUNDS },
  note: { text: chars(1, 65536), ...EPISODE_MESSAGE_BOUNDS },
  forget: { episode: chars(1, 256), path: chars(1, 4096), task: chars(1, 256), ...CLIENT_MESSAGE_BOUNDS },
} as const

/** Fields every client message may carry. */
export interface ClientMessageFields {
  /** at most 256 characters */
  id?: number | string | null
  /** 1 to 256 characters */
  project?: string | null
  /** 1 to 256 characters */
  session?: string | null
}

/** A new chat turn: answer with the memory context to inject. */
export interface ChatStart extends ClientMessageFields {
  type: "chat:start"
  /** at most 65536 characters */
  query: string
}

/**
 * A message that becomes an episode. `episode_id` makes resending it harmless: the same id
 * in the same project is stored once, however often it arrives. `at` is when the event
 * happened (default: when it arrived; a time in the future counts as now).
 */
export interface EpisodeMessageFields extends ClientMessageFields {
  /** 1 to 256 characters */
  episode_id?: string | null
  /** 0 to 100000000000 */
  at?: number | null
}

/** OpenCode wrote a file: remember it and drop cached contexts that name it. */
export interface FileWrite extends EpisodeMessageFields {
  type: "file:write"
  /** 1 to 4096 characters */
  path: string
}

/** OpenCode hit an error: remember it and raise a Datadog event. */
export interface ErrorEvent extends EpisodeMessageFields {
  type: "error"
  /** 1 to 65536 characters */
  message: string
}

/**
 * A task finished: remember it and count its tokens. `summary` is the assistant's final
 * answer, if the client can read it; longer than the text limit, it is clipped.
 */
export interface Completion extends EpisodeMessageFields {
  type: "completion"
  /** 1 to 65536 characters */
  task: string
  /** 0 to 100000000000000, default 0 */
  duration_ms?: number
  /** 0 to 9007199254740992, default 0 */
  tokens?: number
  summary?: string | null
}

/** Search memory directly, bypassing the cache. */
export interface Query extends ClientMessageFields {
  type: "query"
  /** at most 65536 characters */
  query: string
  /** 1 to 100, default 10 */
  limit?: number
}

/** Stream every episode of the project back in chunks. */
export interface Export extends ClientMessageFields {
  type: "export"
  /** 1 to 1000, default 100 */
  chunk_size?: number
}

/** Liveness check; answered with `pong`. */
export interface Ping extends ClientMessageFields {
  type: "ping"
}

/** A memory saved on purpose (by the agent's tool or a person): a task of its own. */
export interface Note extends EpisodeMessageFields {
  type: "note"
  /** 1 to 65536 characters */
  text: string
}

/**
 * Forget memory of the project: one episode, every episode and link of a file, every task
 * of a session, or one task. Exactly one selector; `session` is one of them here, not the
 * message's session.
 */
export interface Forget extends ClientMessageFields {
  type: "forget"
  /** 1 to 256 characters */
  episode?: string | null
  /** 1 to 4096 characters */
  path?: string | null
  /** 1 to 256 characters */
  task?: string | null
}

/** Fields every reply carries: the `id` of the message it answers (or null). */
export interface ReplyFields {
  id: number | string | null
}

/** Answer to chat:start. `hit` is true only when the context came from the cache. */
export interface Context extends ReplyFields {
  type: "context"
  hit: boolean
  inject: string | null
  elapsed_us: number
}

/**
 * Outcome of an event. On success `episode` is the stored episode's id, and `queued` is
 * true when it is durable in the outbox, not yet in memory; a forget's `forgotten` is how
 * many episodes memory let go of.
 */
export interface Ack extends ReplyFields {
  type: "ack"
  ok: boolean
  episode?: string | null
  /** default false */
  queued?: boolean
  forgotten?: number | null
  error?: ErrorInfo | null
}

/**
 * Answer to query: the matching episodes, best first, and `context`: the memory context a
 * chat:start with the same query would get from memory (null: memory has nothing for it).
 */
export interface QueryResult extends ReplyFields {
  type: "result"
  episodes: Episode[]
  context?: string | null
}

/** One chunk of an export, numbered from 0. */
export interface ExportChunk extends ReplyFields {
  type: "export:chunk"
  seq: number
  episodes: Episode[]
}

/** Last message of an export: how many episodes were sent. */
export interface ExportEnd extends ReplyFields {
  type: "export:end"
  count: number
}

/** Answer to ping. */
export interface Pong extends ReplyFields {
  type: "pong"
  /** default 1 */
  version?: number
}

/** Why a request failed: a stable code and a message naming what was wrong. */
export interface ErrorInfo {
  code: string
  message: string
  /** default false */
  retryable?: boolean
}

/** One remembered event, as stored and as returned by search and export. */
export interface Episode {
  uuid: string
  group_id: string
  name: string
  body: string
  source_description: string
  reference_time: number
  metadata?: Record<string, unknown>
}
