locals {
  state_dir = "/var/lib/heliosdb"

  managed = merge(
    {
      cdc        = { checkpoint_dir = "${local.state_dir}/checkpoints" }
      monitoring = { bind_address = "0.0.0.0", prometheus_port = var.metrics_port, health_check_port = var.health_port }
    },
    var.mode == "local" ? {} : {
      transport = merge(
        {
          mode      = var.mode
          ca_file   = "/etc/heliosdb/tls/ca.pem"
          cert_file = "/etc/heliosdb/tls/node.pem"
          key_file  = "/etc/heliosdb/tls/node.key"
        },
        var.mode == "capture" ? { apply_url = var.apply_url } : { listen_address = "0.0.0.0:${var.transport_port}" },
      )
      encryption = { key_file = "/etc/heliosdb/keys/tenant.key" }
    },
  )
  # Every value is written as JSON as soon as sections are merged: a map
  # holds one type, so numbers kept as values would turn into strings
  # (and the daemon's integer keys refuse "1000"). JSON strings are valid
  # TOML basic strings; numbers, booleans and lists of them are TOML as they
  # are.
  node_sections = {
    for s in distinct(concat(keys(var.settings), keys(local.managed))) :
    s => { for k, v in merge(try(var.settings[s], {}), try(local.managed[s], {})) : k => jsonencode(v) }
  }
  tenant_sections = [
    for t in var.tenants : {
      for s in distinct(concat(keys(t.sections), ["replication"])) :
      s => { for k, v in merge(try(t.sections[s], {}), s == "replication" ? { tenant_id = t.tenant_id } : {}) : k => jsonencode(v) }
    }
  ]

  # One tenant: the guide's form (its sections laid over the node's, key by
  # key). Several: the node's sections, then [[tenants]] entries.
  one_tenant = length(var.tenants) == 1
  top_sections = local.one_tenant ? {
    for s in distinct(concat(keys(local.node_sections), keys(local.tenant_sections[0]))) :
    s => merge(try(local.node_sections[s], {}), try(local.tenant_sections[0][s], {}))
  } : local.node_sections

  config_toml = join("\n", concat(
    ["# Rendered by the heliosdb-replication Terraform module (node-config); see docs/configuration.md."],
    [for s in sort(keys(local.top_sections)) : join("\n", concat(
      ["", "[${s}]"],
      [for k in sort(keys(local.top_sections[s])) : "${k} = ${local.top_sections[s][k]}"],
    ))],
    local.one_tenant ? [] : flatten([for t in local.tenant_sections : concat(
      ["", "[[tenants]]"],
      [for s in sort(keys(t)) : join("\n", concat(
        ["[tenants.${s}]"],
        [for k in sort(keys(t[s])) : "${k} = ${t[s][k]}"],
      ))],
    )]),
    [""],
  ))

  # The systemd unit shipped beside this module, unchanged.
  unit = file("${path.module}/../../../systemd/heliosdb-replication.service")

  cloud_init = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    config_toml         = local.config_toml
    unit                = local.unit
    binary_url          = var.binary_url
    binary_sha256       = var.binary_sha256
    environment_command = var.environment_command
    prepare_commands    = var.prepare_commands
    files               = var.files
    provision           = var.mode == "local"
  })
}
