/**
 * What OpenCode's messages and tool calls say, as the texts of the bridge's events: the
 * person's prompt, a session's error, and what went wrong in a failed tool call.
 */
import type { Part, TextPart } from "@opencode-ai/sdk"

/** How many characters of a failed command's output go into its error. */
const OUTPUT_CHARS = 2_000

/** A tool call's arguments. */
export type Args = Record<string, unknown>

/** A tool call's arguments, or none when what OpenCode handed over is not an object. */
export function asArgs(value: unknown): Args {
  return value && typeof value === "object" && !Array.isArray(value) ? (value as Args) : {}
}

/** The first `limit` characters of a text, marked when clipped. */
export function clip(text: string, limit: number): string {
  return text.length <= limit ? text : `${text.slice(0, limit - 1)}…`
}

/** The last `limit` characters of a text (a command's output ends with what went wrong). */
function tail(text: string, limit: number): string {
  return text.length <= limit ? text : `…${text.slice(-(limit - 1))}`
}

/** The person's own text in a message: its text parts that OpenCode did not synthesise. */
export function userText(parts: readonly Part[]): string {
  return parts
    .filter((part): part is TextPart => part.type === "text" && !part.synthetic && !part.ignored)
    .map((part) => part.text)
    .join("\n")
    .trim()
}

/** The text of a session.error event's error: its name and message. */
export function errorText(error: unknown): string {
  if (!error || typeof error !== "object") return ""
  const { name, data } = error as { name?: unknown; data?: { message?: unknown } }
  const message = typeof data?.message === "string" ? data.message.trim() : ""
  const label = typeof name === "string" ? name : ""
  return [label, message].filter(Boolean).join(": ")
}

/** Arguments that name the file a tool works on, in the spellings OpenCode's tools use. */
const PATH_ARGS = ["filePath", "file_path", "path", "file", "filename"]

/** The file a tool call works on, if its arguments name one. */
export function toolPath(args: unknown): string | undefined {
  const given = asArgs(args)
  for (const key of PATH_ARGS) {
    const value = given[key]
    if (typeof value === "string" && value.trim()) return value.trim()
  }
  return undefined
}

/**
 * Tool errors that are no failure: the person refused or interrupted the call (OpenCode's
 * own interface reads these the same way).
 */
const NOT_FAILURES = [
  "Tool execution aborted",
  "QuestionRejectedError",
  "rejected permission",
  "specified a rule",
  "user dismissed",
]

/** Whether a tool's error says the person refused or interrupted the call. */
export function refusedByPerson(error: string): boolean {
  return NOT_FAILURES.some((phrase) => error.includes(phrase))
}

/** The text of an `error` event for a failed tool call: the tool, its file, what went wrong. */
export function toolFailure(tool: string, args: unknown, error: string): string {
  const path = toolPath(args)
  return `Tool ${tool || "?"} failed${path ? ` on ${path}` : ""}: ${error.trim()}`
}

/**
 * What went wrong in a tool call that returned (tool.execute.after), or undefined when
 * nothing did: an `error` in its metadata, or a non-zero `exit` (bash: the exit code,
 * the command and the end of its output).
 */
export function resultFailure(
  args: unknown,
  result: { output?: unknown; metadata?: unknown },
): string | undefined {
  const metadata = asArgs(result?.metadata)
  if (typeof metadata.error === "string" && metadata.error.trim()) return metadata.error.trim()
  const exit = metadata.exit
  if (typeof exit !== "number" || exit === 0) return undefined
  const command = asArgs(args).command
  const output = typeof result.output === "string" ? result.output.trim() : ""
  const ran = typeof command === "string" && command.trim() ? ` from \`${clip(command.trim(), 200)}\`` : ""
  return `exit code ${exit}${ran}${output ? `\n${tail(output, OUTPUT_CHARS)}` : ""}`
}
