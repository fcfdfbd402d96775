output "config_toml" {
  description = "The node file (/etc/heliosdb/replication.toml): no secret in it."
  value       = local.config_toml
}

output "cloud_init" {
  description = "cloud-init user data for a Debian 12 machine: the binary (checked against its SHA-256), the heliosdb user, the node file, the environment file from environment_command, the shipped systemd unit, `init` (local mode), then the service."
  value       = local.cloud_init
  sensitive   = true
}

output "ports" {
  description = "What the node listens on."
  value = merge(
    { metrics = var.metrics_port, health = var.health_port },
    var.mode == "apply" ? { transport = var.transport_port } : {},
  )
}
