/**
 * The real bridge for the plugin's tests: `python -m bridge serve` in its own process (with
 * its own private Valkey), on a loopback port, stopped by every test that starts it.
 *
 * The Python is $BRIDGE_PYTHON, else ../.venv/bin/python relative to plugin/.
 */
import type { Subprocess } from "bun"
import { afterEach } from "bun:test"
import { mkdtempSync, rmSync } from "node:fs"
import { createServer } from "node:net"
import { tmpdir } from "node:os"
import { join, resolve } from "node:path"

export const PLUGIN_DIR = resolve(import.meta.dir, "..")
export const REPO_ROOT = resolve(PLUGIN_DIR, "..")
export const PYTHON = process.env.BRIDGE_PYTHON || join(REPO_ROOT, ".venv", "bin", "python")

/**
 * What a test file cleans up after each of its tests, last first; a step that fails is
 * logged and the others still run. Make one at the file's top level.
 */
export class Cleanups {
  private readonly steps: Array<() => Promise<void> | void> = []

  constructor() {
    afterEach(async () => {
      while (this.steps.length) {
        try {
          await this.steps.pop()!()
        } catch (error) {
          console.error("cleanup failed:", error)
        }
      }
    })
  }

  /** Run `step` after the test. */
  push(step: () => Promise<void> | void): void {
    this.steps.push(step)
  }

  /** A new empty folder, removed after the test. */
  scratchDir(prefix: string): string {
    const dir = scratchDir(prefix)
    this.push(() => removeDir(dir))
    return dir
  }

  /** A bridge for the test, stopped after it (with its data folder, unless one is given). */
  async bridge(options: Partial<BridgeOptions> = {}): Promise<Bridge> {
    const dataDir = options.dataDir ?? this.scratchDir("gb-test-data")
    const bridge = await Bridge.start({ ...options, dataDir })
    this.push(() => {
      bridge.resume() // a paused bridge cannot act on SIGTERM
      return bridge.stop()
    })
    return bridge
  }
}

/** A TCP port on loopback that nothing listens on right now. */
export async function freePort(): Promise<number> {
  return await new Promise((done, fail) => {
    const server = createServer()
    server.once("error", fail)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      server.close(() =>
        typeof address === "object" && address ? done(address.port) : fail(new Error("no port")),
      )
    })
  })
}

/** A scratch folder removed by cleanup(). */
export function scratchDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `${prefix}-`))
}

export function removeDir(path: string): void {
  rmSync(path, { recursive: true, force: true })
}

async function drain(stream: ReadableStream<Uint8Array>, sink: (text: string) => void): Promise<void> {
  const decoder = new TextDecoder()
  for await (const chunk of stream) sink(decoder.decode(chunk, { stream: true }))
}

/** How a bridge is started: its data folder, port (0: a free one), flags and environment. */
export interface BridgeOptions {
  dataDir: string
  port?: number
  args?: string[]
  env?: Record<string, string>
}

export class Bridge {
  /** Everything the process wrote to stderr (its log). */
  stderr = ""
  private stdout = ""

  private constructor(
    readonly process: Subprocess<"ignore", "pipe", "pipe">,
    readonly dataDir: string,
  ) {}

  url = ""
  port = 0

  /** Start a bridge; resolves once it printed where it listens (30 s at most). */
  static async start(options: BridgeOptions): Promise<Bridge> {
    const proc = Bun.spawn(
      [
        PYTHON,
        "-m",
        "bridge",
        "serve",
        "--port",
        String(options.port ?? 0),
        "--data-dir",
        options.dataDir,
        ...(options.args ?? []),
      ],
      {
        cwd: REPO_ROOT,
        stdin: "ignore",
        stdout: "pipe",
        stderr: "pipe",
        env: { ...process.env, ...options.env },
      },
    )
    const bridge = new Bridge(proc, options.dataDir)
    void drain(proc.stdout, (text) => (bridge.stdout += text))
    void drain(proc.stderr, (text) => (bridge.stderr += text))
    const deadline = Date.now() + 30_000
    while (!bridge.stdout.includes("\n")) {
      if (Date.now() > deadline || proc.exitCode !== null) {
        proc.kill("SIGKILL")
        await proc.exited
        throw new Error(`the bridge did not start (${PYTHON}): ${bridge.stdout}${bridge.stderr}`)
      }
      await Bun.sleep(20)
    }
    const match = /listening on (ws:\/\/[\d.]+:(\d+))/.exec(bridge.stdout)
    if (!match) {
      await bridge.stop()
      throw new Error(`unexpected first line from the bridge: ${bridge.stdout}`)
    }
    bridge.url = match[1]!
    bridge.port = Number(match[2])
    return bridge
  }

  get running(): boolean {
    return this.process.exitCode === null && this.process.signalCode === null
  }

  /** SIGTERM (a clean stop), SIGKILL after 20 s. */
  async stop(): Promise<void> {
    if (!this.running) return
    this.process.kill("SIGTERM")
    const stopped = await Promise.race([
      this.process.exited.then(() => true),
      Bun.sleep(20_000).then(() => false),
    ])
    if (!stopped) {
      this.process.kill("SIGKILL")
      await this.process.exited
    }
  }

  /** SIGKILL: the bridge dies mid-flight (its private Valkey goes with it). */
  async kill(): Promise<void> {
    if (!this.running) return
    this.process.kill("SIGKILL")
    await this.process.exited
  }

  /** SIGSTOP / SIGCONT: a bridge that holds its connections open but answers nothing. */
  pause(): void {
    this.process.kill("SIGSTOP")
  }

  resume(): void {
    this.process.kill("SIGCONT")
  }
}

/** Ask the bridge directly (JSON text frames, independent of the plugin's client). */
export async function ask(
  url: string,
  messages: Record<string, unknown>[],
  options: { token?: string; timeoutMs?: number } = {},
): Promise<any[]> {
  const timeoutMs = options.timeoutMs ?? 10_000
  const headers: Record<string, string> = options.token ? { Authorization: `Bearer ${options.token}` } : {}
  const ws = new WebSocket(url, { headers })
  try {
    const replies: any[] = []
    const done = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no replies from ${url} in ${timeoutMs} ms`)),
        timeoutMs,
      )
      ws.addEventListener("error", () => reject(new Error(`cannot talk to ${url}`)))
      ws.addEventListener("open", () => {
        for (const message of messages) ws.send(JSON.stringify(message))
      })
      let finished = 0
      ws.addEventListener("message", (event) => {
        const reply = JSON.parse(String(event.data))
        replies.push(reply)
        if (reply.type !== "export:chunk") finished++
        if (finished === messages.length) {
          clearTimeout(timer)
          resolve()
        }
      })
    })
    await done
    return replies
  } finally {
    ws.close()
  }
}

/** Every episode of a project, oldest first. */
export async function exportEpisodes(url: string, project: string, token?: string): Promise<any[]> {
  const replies = await ask(url, [{ type: "export", id: "x", project, chunk_size: 1000 }], { token })
  return replies
    .filter((reply) => reply.type === "export:chunk")
    .sort((a, b) => a.seq - b.seq)
    .flatMap((reply) => reply.episodes)
}

/** Wait (bounded) until a condition holds; false if it never did. */
export async function until(condition: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (!condition()) {
    if (Date.now() > deadline) return false
    await Bun.sleep(10)
  }
  return true
}
