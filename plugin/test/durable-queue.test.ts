/**
 * The queue file on its own (lib/durable-queue.ts): order, bound, torn lines, adoption of
 * the files of processes that are gone (one of them killed for real mid-run), and a folder
 * that cannot be used. No bridge: test/plugin.test.ts sends what it holds to a real one.
 */
import { afterEach, describe, expect, test } from "bun:test"
import { appendFileSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs"
import { join, resolve } from "node:path"
import { QueueFile, type QueuedEvent, readQueueFile } from "../lib/durable-queue.ts"
import type { Logger } from "../lib/log.ts"
import { removeDir, scratchDir } from "./bridge.ts"

const cleanups: Array<() => void> = []
afterEach(() => {
  while (cleanups.length) cleanups.pop()!()
})

function folder(): string {
  const dir = scratchDir("gb-queue")
  cleanups.push(() => removeDir(dir))
  return dir
}

function capture(): { log: Logger; lines: string[] } {
  const lines: string[] = []
  return { lines, log: (level, message) => lines.push(`${level} ${message}`) }
}

let counter = 0
function event(path: string, at = 1_790_000_000 + ++counter): QueuedEvent {
  return { type: "file:write", path, project: "shop", at, episode_id: `ep-${path}` }
}

function open(dir: string, maxEvents = 100, log: Logger = () => {}): QueueFile {
  const queue = new QueueFile(dir, { maxEvents, log })
  cleanups.push(() => queue.close())
  return queue
}

const paths = (events: readonly QueuedEvent[]): unknown[] =>
  events.map((e) => (e.type === "file:write" ? e.path : undefined))

/** A pid no process has now: one that just exited. */
async function deadPid(): Promise<number> {
  const child = Bun.spawn(["true"])
  await child.exited
  return child.pid
}

describe("the queue file", () => {
  test("what was not settled comes back after a restart, in order, and the new file holds it", () => {
    const dir = folder()
    const { log, lines } = capture()
    const first = open(dir, 100, log)
    for (const path of ["a", "b", "c", "d", "e"]) first.add(event(path))
    first.done("ep-b")
    first.done("ep-d")
    first.done("ep-unknown") // settling what was never queued changes nothing
    first.close()

    const second = open(dir, 100, log)
    expect(paths(second.recovered)).toEqual(["a", "c", "e"])
    expect(second.path).not.toBeNull()
    expect(readdirSync(dir)).toEqual([second.path!.split("/").pop()!])
    expect(paths(readQueueFile(second.path!, log))).toEqual(["a", "c", "e"])
    expect(lines.filter((line) => line.startsWith("warn"))).toEqual([])
    expect(lines).toEqual([`info recovered 3 unacknowledged events from ${dir}`])
  })

  test("past its bound the oldest events are dropped, with a warning", () => {
    const dir = folder()
    const first = open(dir)
    for (const path of ["1", "2", "3", "4", "5", "6"]) first.add(event(path))
    first.close()
    const { log, lines } = capture()
    const second = open(dir, 4, log)
    expect(paths(second.recovered)).toEqual(["3", "4", "5", "6"])
    expect(lines.filter((line) => line.startsWith("warn"))).toEqual([
      "warn the event queue holds 6 events, more than its bound of 4: dropped the 2 oldest",
    ])
  })

  test("a torn last line (a crash mid-write) and unreadable lines are skipped with a warning", () => {
    const dir = folder()
    const first = open(dir)
    for (const path of ["a", "b"]) first.add(event(path))
    const file = first.path!
    first.close()
    appendFileSync(file, "not json\n")
    // A request is never queued: a line holding one is not an event.
    appendFileSync(file, `${JSON.stringify({ event: { ...event("x"), type: "chat:start", query: "x" } })}\n`)
    appendFileSync(file, `${JSON.stringify({ event: event("c") })}\n`)
    appendFileSync(file, `{"event":{"type":"file:write","path":"d","at":1`)
    const { log, lines } = capture()
    const second = open(dir, 100, log)
    expect(paths(second.recovered)).toEqual(["a", "b", "c"])
    const warnings = lines.filter((line) => line.startsWith("warn"))
    expect(warnings.length).toBe(2)
    expect(warnings[0]).toContain("skipped a torn last line")
    expect(warnings[1]).toContain("skipped 2 unreadable lines")
    // The file it writes holds whole lines only.
    expect(readFileSync(second.path!, "utf8").endsWith("\n")).toBe(true)
  })

  test("it stays bounded: emptied when nothing is pending, rewritten as settled lines pile up", () => {
    const dir = folder()
    const queue = open(dir, 1000)
    const events = Array.from({ length: 300 }, (_, i) => event(`f${i}`))
    for (const e of events) queue.add(e)
    for (const e of events.slice(0, 250)) queue.done(e.episode_id)
    const lines = readFileSync(queue.path!, "utf8").trim().split("\n")
    expect(lines.length).toBeLessThanOrEqual(2 * 50 + 64 + 1)
    expect(paths(readQueueFile(queue.path!, () => {}))).toEqual(paths(events.slice(250)))
    for (const e of events.slice(250)) queue.done(e.episode_id)
    expect(statSync(queue.path!).size).toBe(0)
    const path = queue.path!
    queue.close()
    expect(readdirSync(dir)).toEqual([]) // nothing pending: no file left behind
    expect(path.startsWith(resolve(dir))).toBe(true)
  })

  test("files of running processes are left alone; those of processes gone are adopted, oldest first", async () => {
    const dir = folder()
    const gone = await deadPid()
    const write = (name: string, events: QueuedEvent[]): void =>
      writeFileSync(join(dir, name), events.map((e) => `${JSON.stringify({ event: e })}\n`).join(""))
    write(`${process.ppid}-aaaaaa.jsonl`, [event("running", 1)])
    write(`${gone}-bbbbbb.jsonl`, [event("later-1", 20), event("later-2", 21)])
    write(`${gone}-cccccc.1.jsonl`, [event("earlier-1", 10), event("earlier-2", 30)])
    write(`${gone}-dddddd.jsonl.tmp`, [event("half-written", 5)])
    writeFileSync(join(dir, "notes.txt"), "not a queue file")

    const queue = open(dir)
    expect(paths(queue.recovered)).toEqual(["earlier-1", "earlier-2", "later-1", "later-2"])
    expect(readdirSync(dir).sort()).toEqual(
      [`${process.ppid}-aaaaaa.jsonl`, queue.path!.split("/").pop()!, "notes.txt"].sort(),
    )
  })

  test("two plugin instances in one process never take each other's file", () => {
    const dir = folder()
    const first = open(dir)
    first.add(event("mine"))
    const second = open(dir)
    expect(second.recovered).toEqual([])
    expect(paths(readQueueFile(first.path!, () => {}))).toEqual(["mine"])
  })

  test("a process killed mid-run leaves every event it recorded for the next one", async () => {
    const dir = folder()
    const module = resolve(import.meta.dir, "../lib/durable-queue.ts")
    const script = `
      import { QueueFile } from ${JSON.stringify(module)}
      const queue = new QueueFile(${JSON.stringify(dir)}, { maxEvents: 100, log: () => {} })
      for (let i = 0; i < 20; i++)
        queue.add({ type: "error", message: "e" + i, at: 1790000000 + i, episode_id: "ep" + i })
      for (let i = 0; i < 5; i++) queue.done("ep" + i)
      process.kill(process.pid, "SIGKILL")
    `
    const child = Bun.spawn([process.execPath, "-e", script], { stdout: "ignore", stderr: "pipe" })
    expect(await child.exited).not.toBe(0)
    expect(child.signalCode).toBe("SIGKILL")
    const queue = open(dir)
    expect(queue.recovered.map((e) => e.episode_id)).toEqual(
      Array.from({ length: 15 }, (_, i) => `ep${i + 5}`),
    )
  })

  test("a folder that cannot be used: events kept in memory only, one warning, nothing thrown", () => {
    const dir = folder()
    const blocker = join(dir, "a-file")
    writeFileSync(blocker, "")
    const { log, lines } = capture()
    const queue = open(join(blocker, "queue"), 100, log)
    expect(queue.path).toBeNull()
    queue.add(event("a"))
    queue.done("ep-a")
    queue.close()
    const warnings = lines.filter((line) => line.startsWith("warn"))
    expect(warnings.length).toBe(1)
    expect(warnings[0]).toContain("events wait in memory only")
  })
})
