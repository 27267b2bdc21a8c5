/**
 * The event queue on disk: events the bridge has not acknowledged outlive OpenCode (a
 * restart, a crash) and are sent again, in order and with their own `episode_id`, so the
 * bridge stores each one once however often it arrives.
 *
 * One folder per project. Each OpenCode process writes only its own file in it,
 * `<pid>-<random>.jsonl`, so two OpenCode processes in one project never share a file. A
 * file is a log of JSON lines:
 *
 *   {"event": {...}}        appended and fsynced before the event is sent
 *   {"done": "<episode>"}   acknowledged, refused for good or dropped (not fsynced: a lost
 *                           "done" only sends again an event the bridge already holds)
 *
 * It is emptied whenever nothing is pending, and rewritten (temporary file, fsync, rename)
 * when its "done" lines outnumber the pending events, so it stays bounded. At start-up a
 * process adopts the files of processes that are gone: it renames each to a name of its own
 * (of two processes, one wins the rename), reads the events still pending (a torn last
 * line, left by a crash mid-write, is skipped with a warning), writes them, oldest first, to
 * its own file, and deletes what it adopted.
 */
import { createHash, randomBytes } from "node:crypto"
import {
  closeSync,
  fsyncSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  unlinkSync,
  writeSync,
} from "node:fs"
import { homedir } from "node:os"
import { basename, join, resolve } from "node:path"
import { describe, type Logger } from "./log.ts"
import { EPISODE_TYPES } from "./protocol.ts"
import type { StampedEvent } from "./wire.ts"

/** A queued event: a message to the bridge, stamped with the id the bridge stores it under. */
export type QueuedEvent = StampedEvent

const EVENT_TYPES: ReadonlySet<string> = new Set(EPISODE_TYPES)

/** A queue file (a process's own, or one it adopted), and a rewrite's temporary file. */
const QUEUE_FILE = /^(\d+)-[0-9a-f]+(?:\.\d+)?\.jsonl$/
const TEMP_SUFFIX = ".tmp"
/** "done" lines a file may hold beyond twice its pending events before it is rewritten. */
const REWRITE_SLACK = 64

/** Queue files open in this process: another plugin instance in it must not adopt them. */
const held = new Set<string>()

/** The default folder of a project's queue: under the user's state directory. */
export function defaultQueueDir(env: Record<string, string | undefined>, directory: string): string {
  const state = env.XDG_STATE_HOME?.trim() || join(env.HOME?.trim() || homedir(), ".local", "state")
  const folder = resolve(directory)
  const name = (basename(folder) || "root").replace(/[^\w.-]+/g, "_")
  const hash = createHash("sha256").update(folder).digest("hex").slice(0, 12)
  return join(state, "opencode-graphiti-memory", `${name}-${hash}`)
}

/** Whether a line holds an event: an episode message, stamped (the bridge checks the rest). */
function isQueued(value: unknown): value is QueuedEvent {
  const event = value as { type?: unknown; episode_id?: unknown; at?: unknown } | null
  return (
    typeof event === "object" &&
    event !== null &&
    typeof event.type === "string" &&
    EVENT_TYPES.has(event.type) &&
    typeof event.episode_id === "string" &&
    typeof event.at === "number"
  )
}

/** Whether the process `pid` is running (EPERM: it is, as another user). */
function running(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return (error as { code?: string }).code === "EPERM"
  }
}

function writeAll(fd: number, text: string): void {
  const bytes = Buffer.from(text)
  for (let done = 0; done < bytes.length;) done += writeSync(fd, bytes, done)
}

/** Make a rename or unlink in `dir` durable (where the platform allows it). */
function syncDir(dir: string): void {
  try {
    const fd = openSync(dir, "r")
    try {
      fsyncSync(fd)
    } finally {
      closeSync(fd)
    }
  } catch {
    // not supported here; the data itself was fsynced
  }
}

/** Replace `path` with `text` so that a crash leaves either the old file or the new one. */
function replaceFile(path: string, text: string): void {
  const temp = path + TEMP_SUFFIX
  const fd = openSync(temp, "w", 0o600)
  try {
    writeAll(fd, text)
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
  renameSync(temp, path)
}

/** The events still pending in a queue file, oldest first. */
export function readQueueFile(path: string, log: Logger): QueuedEvent[] {
  const lines = readFileSync(path, "utf8").split("\n")
  const torn = lines.pop() // "" when the file ends with a newline, as every complete write does
  if (torn) log("warn", `${path}: skipped a torn last line (${torn.length} characters), left by a crash`)
  const events = new Map<string, QueuedEvent>()
  let unreadable = 0
  for (const line of lines) {
    if (!line) continue
    let record: { event?: unknown; done?: unknown }
    try {
      record = JSON.parse(line)
    } catch {
      unreadable++
      continue
    }
    if (isQueued(record?.event)) {
      if (!events.has(record.event.episode_id)) events.set(record.event.episode_id, record.event)
    } else if (typeof record?.done === "string") events.delete(record.done)
    else unreadable++
  }
  if (unreadable) log("warn", `${path}: skipped ${unreadable} unreadable lines`)
  return [...events.values()]
}

export interface QueueFileOptions {
  /** Most events kept; past it the oldest are dropped, with a warning. */
  maxEvents: number
  log: Logger
}

/** This process's queue file in a project's queue folder. Never throws. */
export class QueueFile {
  /** What earlier processes left unacknowledged, oldest first (at most maxEvents). */
  readonly recovered: QueuedEvent[] = []
  /** This process's file; null once the disk failed (events are then kept in memory only). */
  path: string | null
  private fd: number | null = null
  /** Pending events by episode id, oldest first, each with its line. */
  private readonly pending = new Map<string, string>()
  /** Lines in the file. */
  private lines = 0

  constructor(
    readonly dir: string,
    private readonly options: QueueFileOptions,
  ) {
    this.path = join(dir, `${process.pid}-${randomBytes(6).toString("hex")}.jsonl`)
    held.add(this.path)
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 })
      const adopted = this.adopt()
      this.recovered = this.bound(adopted.flatMap(({ events }) => events))
      for (const event of this.recovered) this.pending.set(event.episode_id, line(event))
      if (this.pending.size) replaceFile(this.path, [...this.pending.values()].join(""))
      this.fd = openSync(this.path, "a", 0o600)
      this.lines = this.pending.size
      syncDir(dir)
      for (const { path } of adopted) {
        unlinkSync(path)
        held.delete(path)
      }
      if (adopted.length) syncDir(dir)
    } catch (error) {
      this.fail(error)
    }
  }

  /** Record an event before it is sent; it is on disk when this returns. */
  add(event: QueuedEvent): void {
    const text = line(event)
    this.pending.set(event.episode_id, text)
    this.append(text, true)
  }

  /** The event is settled (acknowledged, refused for good or dropped): not to be sent again. */
  done(episodeId: string): void {
    if (!this.pending.delete(episodeId) || this.fd === null) return
    try {
      if (this.pending.size === 0) {
        ftruncateSync(this.fd, 0)
        this.lines = 0
        return
      }
      this.append(`${JSON.stringify({ done: episodeId })}\n`, false)
      if (this.lines > 2 * this.pending.size + REWRITE_SLACK) this.rewrite()
    } catch (error) {
      this.fail(error)
    }
  }

  /** Close the file; what is pending stays in it for the next start. */
  close(): void {
    const { fd, path } = this
    this.fd = null
    if (fd !== null) {
      try {
        fsyncSync(fd)
        closeSync(fd)
        if (this.pending.size === 0 && path) unlinkSync(path)
      } catch (error) {
        this.options.log("warn", `closing the event queue file ${path}: ${describe(error)}`)
      }
    }
    if (path) held.delete(path)
  }

  // -- internals ----------------------------------------------------------------------

  /**
   * Take over the queue files of processes that are gone (and leftovers of this process's
   * earlier plugin instances), oldest first; remove temporary files of rewrites they did
   * not finish (the file they were replacing is still whole).
   */
  private adopt(): Array<{ path: string; events: QueuedEvent[] }> {
    const adopted: Array<{ path: string; events: QueuedEvent[] }> = []
    let n = 0
    for (const name of readdirSync(this.dir).sort()) {
      const temp = name.endsWith(TEMP_SUFFIX)
      const match = QUEUE_FILE.exec(temp ? name.slice(0, -TEMP_SUFFIX.length) : name)
      if (!match) continue
      const path = join(this.dir, name)
      const owner = Number(match[1])
      const orphan =
        owner === process.pid ? !held.has(temp ? path.slice(0, -TEMP_SUFFIX.length) : path) : !running(owner)
      if (!orphan) continue
      if (temp) {
        unlinkSync(path)
        continue
      }
      const mine = this.path!.replace(/\.jsonl$/, `.${++n}.jsonl`)
      try {
        renameSync(path, mine) // only one process wins the rename of a file
      } catch (error) {
        if ((error as { code?: string }).code === "ENOENT") continue
        throw error
      }
      held.add(mine)
      const events = readQueueFile(mine, this.options.log)
      adopted.push({ path: mine, events })
    }
    // Files in the order their events happened (each file's own order is kept).
    const first = (events: QueuedEvent[]): number => events[0]?.at ?? 0
    adopted.sort((a, b) => first(a.events) - first(b.events))
    if (adopted.some(({ events }) => events.length))
      this.options.log(
        "info",
        `recovered ${adopted.reduce((sum, { events }) => sum + events.length, 0)} unacknowledged events from ${this.dir}`,
      )
    return adopted
  }

  /** At most maxEvents of `events`, the newest, each once; a warning if any were dropped. */
  private bound(events: QueuedEvent[]): QueuedEvent[] {
    const unique = [...new Map(events.map((event) => [event.episode_id, event])).values()]
    const excess = unique.length - this.options.maxEvents
    if (excess <= 0) return unique
    this.options.log(
      "warn",
      `the event queue holds ${unique.length} events, more than its bound of ${this.options.maxEvents}: ` +
        `dropped the ${excess} oldest`,
    )
    return unique.slice(excess)
  }

  private append(text: string, sync: boolean): void {
    if (this.fd === null) return
    try {
      writeAll(this.fd, text)
      if (sync) fsyncSync(this.fd)
      this.lines++
    } catch (error) {
      this.fail(error)
    }
  }

  /** Rewrite the file with the pending events alone. */
  private rewrite(): void {
    if (!this.path || this.fd === null) return
    replaceFile(this.path, [...this.pending.values()].join(""))
    closeSync(this.fd)
    this.fd = openSync(this.path, "a", 0o600)
    this.lines = this.pending.size
    syncDir(this.dir)
  }

  /** The disk failed: log it once and keep events in memory only from now on. */
  private fail(error: unknown): void {
    this.options.log(
      "warn",
      `cannot keep the event queue in ${this.dir}: ${describe(error)}; ` +
        "events wait in memory only, and are lost if OpenCode stops before the bridge has them",
    )
    if (this.fd !== null) {
      try {
        closeSync(this.fd)
      } catch {
        // already unusable
      }
    }
    this.fd = null
    if (this.path) held.delete(this.path)
    this.path = null
  }
}

function line(event: QueuedEvent): string {
  return `${JSON.stringify({ event })}\n`
}
