variable "name" {
  description = "Names the node's resources (e.g. heliosdb-eu-west-1)."
  type        = string
  default     = "heliosdb-replication"
}

variable "vpc_id" {
  description = "The VPC of the node (and, usually, of the database it is next to)."
  type        = string
}

variable "subnet_id" {
  description = "A private subnet for the node: it needs no public address."
  type        = string
}

variable "ami_id" {
  description = "A Debian 12 AMI (cloud-init, curl, systemd). Pin it: a changed AMI replaces the instance."
  type        = string
}

variable "instance_type" {
  description = "One node per slot (a slot has one reader): size it for the tenants it serves; c6i.large serves dozens."
  type        = string
  default     = "c6i.large"
}

variable "state_volume_gb" {
  description = "Checkpoints, spools (spool_max_mb per tenant at most) and the audit log."
  type        = number
  default     = 50
}

variable "kms_key_arn" {
  description = "A customer-managed KMS key for the volumes and the connection secret; empty: the module creates one (rotation on)."
  type        = string
  default     = ""
}

variable "connections_secret_arn" {
  description = "A Secrets Manager secret whose text is the node's environment file (REPLICATION_SOURCE_CONNECTION=…, REPLICATION_TARGET_CONNECTION=… lines). Created and filled by you: no password passes through Terraform state."
  type        = string
}

variable "database_cidrs" {
  description = "Where the databases this node connects to are (source, target or both)."
  type        = list(string)
}

variable "database_port" {
  type    = number
  default = 5432
}

variable "monitoring_cidrs" {
  description = "Who may scrape /metrics and ask /health (Prometheus, a load balancer's health check)."
  type        = list(string)
  default     = []
}

variable "transport_cidrs" {
  description = "Apply node: the capture nodes' addresses. Capture node: the apply node's."
  type        = list(string)
  default     = []
}

variable "https_egress_cidrs" {
  description = "HTTPS the node needs at boot and while running: the binary's download, Secrets Manager, SSM and CloudWatch endpoints (VPC endpoints' CIDRs, or a NAT)."
  type        = list(string)
}

variable "node" {
  description = "What the node runs: the node-config module's inputs (mode, tenants, settings, ports, apply_url, binary_url, binary_sha256)."
  type = object({
    mode           = optional(string, "local")
    tenants        = list(object({ tenant_id = string, sections = optional(any, {}) }))
    settings       = optional(any, {})
    metrics_port   = optional(number, 9090)
    health_port    = optional(number, 8080)
    transport_port = optional(number, 8443)
    apply_url      = optional(string, "")
    binary_url     = string
    binary_sha256  = string
  })
}

variable "enable_monitoring" {
  description = "Detailed (1-minute) instance metrics."
  type        = bool
  default     = true
}

variable "enable_backups" {
  description = "Daily snapshots of the state volume (checkpoints, spools, audit log) by Data Lifecycle Manager."
  type        = bool
  default     = true
}

variable "backup_retention_days" {
  type    = number
  default = 30
}

variable "create_logical_replication_parameter_group" {
  description = "Also create an RDS parameter group with rds.logical_replication = 1 for the source (attach it to your instance and reboot it)."
  type        = bool
  default     = false
}

variable "rds_parameter_group_family" {
  type    = string
  default = "postgres16"
}

variable "tags" {
  type    = map(string)
  default = {}
}
