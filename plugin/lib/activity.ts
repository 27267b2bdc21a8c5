/**
 * Which session an event belongs to when OpenCode does not say. A `file.edited` event names
 * only the file, and a `session.error` may name no session; the plugin picks one from what
 * it saw: the tool calls running or done with their arguments, the sessions busy, and the
 * session active last.
 */
import { relative, resolve } from "node:path"
import { type Args, asArgs } from "./event-text.ts"
import { Memo } from "./memo.ts"
import { BOUNDS } from "./protocol.ts"

/** Longer than the protocol's paths, an argument names no file. */
const MAX_PATH = BOUNDS["file:write"].path.maxLength

/** A tool call, from its start, for finding the session of a file.edited event. */
interface ToolCall {
  sessionID: string
  args: Args
  /** When it started or was last seen (a counter, so later is larger). */
  tick: number
  done: boolean
}

export class SessionActivity {
  private tick = 0
  /** Tool calls by session and call id, and the calls whose failure was reported. */
  private readonly calls = new Memo<ToolCall>()
  private readonly reported = new Memo<true>()
  /** When each session last went busy (deleted when it goes idle), and was last active. */
  private readonly busy = new Memo<number>()
  private readonly active = new Memo<number>()

  /** `base`: the folder relative paths are resolved against. */
  constructor(private readonly base: string) {}

  /** The session did something (a prompt, a reply, a tool call). */
  touch(sessionID: string): void {
    this.active.set(sessionID, ++this.tick)
  }

  /** The session's status: busy (from the first such report on) or idle. */
  status(sessionID: string, idle: boolean): void {
    if (idle) this.busy.delete(sessionID)
    else if (!this.busy.has(sessionID)) this.busy.set(sessionID, ++this.tick)
  }

  /** A tool call started (or was seen running): remember its arguments and session. */
  callStarted(sessionID: string, callID: string, args: unknown, restart: boolean): void {
    const key = callKey(sessionID, callID)
    const known = this.calls.get(key)
    const given = asArgs(args)
    if (restart || !known) {
      if (restart) this.reported.delete(key)
      this.calls.set(key, { sessionID, args: given, tick: ++this.tick, done: false })
    } else if (Object.keys(given).length) {
      known.args = given
    }
    this.touch(sessionID)
  }

  /** A tool call finished (returned or failed). */
  callDone(sessionID: string, callID: string, args: unknown): void {
    const key = callKey(sessionID, callID)
    const known = this.calls.get(key)
    if (known) known.done = true
    else this.calls.set(key, { sessionID, args: asArgs(args), tick: ++this.tick, done: true })
  }

  /** Whether this is the first failure reported for the call (since it last started). */
  firstFailure(sessionID: string, callID: string): boolean {
    const key = callKey(sessionID, callID)
    if (this.reported.has(key)) return false
    this.reported.set(key, true)
    return true
  }

  /**
   * The session a file.edited event belongs to (the event does not say). In this order:
   * the session of the latest tool call still running whose arguments name the file
   * (OpenCode publishes file.edited while the tool that wrote it runs); then of the latest
   * finished call that named it; then of the latest call still running; then the session
   * that went busy last and is not idle yet; then the session that was active last.
   */
  sessionOfFile(file: string): string | undefined {
    const target = resolve(this.base, file)
    const relativePath = relative(this.base, target)
    const names = (args: Args): boolean =>
      Object.values(args).some((value) => {
        if (typeof value !== "string" || !value) return false
        if (!value.includes("\n"))
          return value.length <= MAX_PATH && resolve(this.base, value.trim()) === target
        // A patch names its files in its text.
        return value.includes(target) || (!relativePath.startsWith("..") && value.includes(relativePath))
      })
    let best: { session: string; rank: number; tick: number } | undefined
    const consider = (session: string, rank: number, at: number): void => {
      if (!best || rank > best.rank || (rank === best.rank && at > best.tick))
        best = { session, rank, tick: at }
    }
    for (const [, call] of this.calls.entries()) {
      const named = names(call.args)
      if (named || !call.done) consider(call.sessionID, named ? (call.done ? 3 : 4) : 2, call.tick)
    }
    for (const [session, at] of this.busy.entries()) consider(session, 1, at)
    for (const [session, at] of this.active.entries()) consider(session, 0, at)
    return best?.session
  }

  /** The session of an event that does not name one: the busy one, else the one active last. */
  latestSession(): string | undefined {
    let latest: [string, number] | undefined
    for (const [session, at] of this.busy.entries()) if (!latest || at > latest[1]) latest = [session, at]
    if (latest) return latest[0]
    for (const [session, at] of this.active.entries()) if (!latest || at > latest[1]) latest = [session, at]
    return latest?.[0]
  }
}

function callKey(sessionID: string, callID: string): string {
  return `${sessionID}\u0000${callID}`
}
