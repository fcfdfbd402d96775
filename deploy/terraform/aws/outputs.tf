output "instance_id" {
  value = aws_instance.node.id
}

output "private_ip" {
  value = aws_instance.node.private_ip
}

output "security_group_id" {
  description = "Allow it in the databases' security groups (port ${var.database_port})."
  value       = aws_security_group.node.id
}

output "state_volume_id" {
  value = aws_ebs_volume.state.id
}

output "metrics_url" {
  value = "http://${aws_instance.node.private_ip}:${var.node.metrics_port}/metrics"
}

output "health_url" {
  value = "http://${aws_instance.node.private_ip}:${var.node.health_port}/health"
}

output "config_toml" {
  description = "The node file the instance runs."
  value       = module.node_config.config_toml
}

output "logical_replication_parameter_group" {
  description = "Attach it to the source's RDS instance (and reboot it) when created."
  value       = try(aws_db_parameter_group.logical_replication[0].name, null)
}
