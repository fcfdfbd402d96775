variable "mode" {
  description = "local (capture and apply in one process, one or many tenants), capture or apply (the halves of a split deployment, one or many tenants each)."
  type        = string
  default     = "local"
  validation {
    condition     = contains(["local", "capture", "apply"], var.mode)
    error_message = "mode must be local, capture or apply."
  }
}

variable "tenants" {
  description = "The tenants this node serves. Each may set the sections a [[tenants]] entry may set (replication, source, target, cdc, encryption, conflict, compression) as maps of keys; tenant_id is required. No password: connections come from the environment file."
  type = list(object({
    tenant_id = string
    sections  = optional(any, {})
  }))
  validation {
    condition     = length(var.tenants) >= 1
    error_message = "List at least one tenant."
  }
  validation {
    condition     = alltrue([for t in var.tenants : can(regex("^[A-Za-z0-9._-]{1,128}$", t.tenant_id))])
    error_message = "A tenant_id is 1 to 128 characters from A-Z a-z 0-9 - _ . (it names the checkpoint file)."
  }
  validation {
    condition     = length(distinct([for t in var.tenants : t.tenant_id])) == length(var.tenants)
    error_message = "Tenant ids must differ."
  }
  validation {
    condition = alltrue(flatten([for t in var.tenants : [for s in keys(t.sections) :
    contains(["replication", "source", "target", "cdc", "encryption", "conflict", "compression"], s)]]))
    error_message = "A tenant may set replication, source, target, cdc, encryption, conflict and compression; the other sections are the node's (settings)."
  }
}

variable "settings" {
  description = "The node's sections of replication.toml (docs/configuration.md), e.g. { cdc = { replication_slot = \"region_eu_slot\" }, performance = { batch_timeout_ms = 100 } }. checkpoint_dir, the monitoring ports and [transport] are set from the other variables."
  # any, not map(map(any)): a map would turn every value into one type
  # (numbers into strings), and the daemon's integer keys refuse "1000".
  type    = any
  default = {}
}

variable "metrics_port" {
  type    = number
  default = 9090
}

variable "health_port" {
  type    = number
  default = 8080
}

variable "transport_port" {
  description = "Apply node: the port capture nodes connect to."
  type        = number
  default     = 8443
}

variable "apply_url" {
  description = "Capture node: https://host:port of the apply node."
  type        = string
  default     = ""
  validation {
    condition     = var.apply_url == "" || startswith(var.apply_url, "https://")
    error_message = "apply_url is an https:// URL."
  }
}

variable "binary_url" {
  description = "Where the machine downloads the heliosdb-tenant-replication binary (a release asset or your artifact store)."
  type        = string
}

variable "binary_sha256" {
  description = "The binary's SHA-256: the machine refuses a download that differs."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.binary_sha256))
    error_message = "binary_sha256 is 64 lowercase hex characters."
  }
}

variable "environment_command" {
  description = "A shell command (cloud-specific) that prints the environment file: REPLICATION_SOURCE_CONNECTION=… and REPLICATION_TARGET_CONNECTION=… lines, e.g. read from a secret store at boot. Its output never reaches the user data."
  type        = string
}

variable "prepare_commands" {
  description = "Shell commands (cloud-specific) run first at boot, e.g. mounting the state volume at /var/lib/heliosdb."
  type        = list(string)
  default     = []
}

variable "files" {
  description = "More files for the machine (path => { content, mode }), e.g. keys and TLS files of a split node fetched some other way."
  type = map(object({
    content = string
    mode    = optional(string, "0640")
  }))
  default   = {}
  sensitive = true
}
