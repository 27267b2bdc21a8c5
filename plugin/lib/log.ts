/** Logging shared by the plugin's parts: levels, the error prefix, a logger that never throws. */

/** Every failure the plugin absorbs is logged with this prefix. */
export const ERROR_PREFIX = "Memory plugin error"

export type LogLevel = "debug" | "info" | "warn" | "error"
export type Logger = (level: LogLevel, message: string) => void

/** A logger that never throws (a failing logger must not reach OpenCode either). */
export function safeLogger(log: Logger): Logger {
  return (level, message) => {
    try {
      log(level, message)
    } catch {
      // nowhere left to report it
    }
  }
}

/** Text of an error, for logs. */
export function describe(error: unknown): string {
  if (error instanceof Error) return `${error.name}: ${error.message}`
  try {
    return typeof error === "string" ? error : JSON.stringify(error)
  } catch {
    return String(error)
  }
}
