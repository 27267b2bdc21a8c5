/** The plugin's settings: environment variables read once, bad values replaced by defaults. */
import type { PluginInput } from "@opencode-ai/plugin"
import { basename } from "node:path"
import type { Logger } from "./log.ts"

export const DEFAULT_URL = "ws://127.0.0.1:8765"
export const DEFAULT_DEADLINE_MS = 300
export const DEFAULT_QUEUE = 1000

export interface Settings {
  url: string
  token?: string
  deadlineMs: number
  maxQueue: number
  /** Folder of the event queue files; undefined: the default for the project directory. */
  queueDir?: string
  project?: string
}

function intSetting(
  env: Record<string, string | undefined>,
  name: string,
  fallback: number,
  log: Logger,
): number {
  const raw = env[name]
  if (raw === undefined || raw.trim() === "") return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value < 0) {
    log("warn", `${name}=${JSON.stringify(raw)} is not a whole number >= 0; using ${fallback}`)
    return fallback
  }
  return value
}

/** The plugin's settings from environment variables; bad values fall back to defaults. */
export function settingsFromEnv(env: Record<string, string | undefined>, log: Logger = () => {}): Settings {
  let url = env.GRAPHITI_BRIDGE_URL?.trim() || DEFAULT_URL
  try {
    const parsed = new URL(url)
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") throw new Error("not ws")
  } catch {
    log("warn", `GRAPHITI_BRIDGE_URL=${JSON.stringify(url)} is not a ws:// URL; using ${DEFAULT_URL}`)
    url = DEFAULT_URL
  }
  return {
    url,
    token: env.GRAPHITI_BRIDGE_TOKEN?.trim() || undefined,
    deadlineMs: intSetting(env, "GRAPHITI_BRIDGE_DEADLINE_MS", DEFAULT_DEADLINE_MS, log),
    maxQueue: intSetting(env, "GRAPHITI_BRIDGE_QUEUE", DEFAULT_QUEUE, log),
    queueDir: env.GRAPHITI_BRIDGE_QUEUE_DIR?.trim() || undefined,
    project: env.GRAPHITI_BRIDGE_PROJECT?.trim() || undefined,
  }
}

/** The project name: the setting, else the name of the worktree (or directory) folder. */
export function projectName(input: Pick<PluginInput, "worktree" | "directory">, setting?: string): string {
  if (setting) return setting
  for (const folder of [input.worktree, input.directory]) {
    const name = folder && folder !== "/" ? basename(folder.replace(/[\\/]+$/, "")) : ""
    if (name) return name
  }
  return "default"
}
