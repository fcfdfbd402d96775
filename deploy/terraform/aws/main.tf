data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_subnet" "node" {
  id = var.subnet_id
}

locals {
  tags    = merge(var.tags, { Service = "heliosdb-replication", Name = var.name })
  kms_key = var.kms_key_arn != "" ? var.kms_key_arn : aws_kms_key.node[0].arn
  region  = data.aws_region.current.name
}

# --- what the node runs (generic) ---

module "node_config" {
  source = "../modules/node-config"

  mode           = var.node.mode
  tenants        = var.node.tenants
  settings       = var.node.settings
  metrics_port   = var.node.metrics_port
  health_port    = var.node.health_port
  transport_port = var.node.transport_port
  apply_url      = var.node.apply_url
  binary_url     = var.node.binary_url
  binary_sha256  = var.node.binary_sha256

  # The environment file comes from Secrets Manager at boot; the secret's
  # text never passes through Terraform.
  environment_command = "aws secretsmanager get-secret-value --region ${local.region} --secret-id '${var.connections_secret_arn}' --query SecretString --output text"
  prepare_commands = [
    "command -v aws >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q awscli; }",
    # The state volume (attached as /dev/sdf; NVMe names it by its id): wait
    # for it, make a file system only if it has none, mount it by UUID.
    join(" ", [
      "dev=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${replace(aws_ebs_volume.state.id, "-", "")};",
      "for _ in $(seq 60); do [ -e \"$dev\" ] && break; sleep 5; done; [ -e \"$dev\" ];",
      "blkid \"$dev\" >/dev/null || mkfs.ext4 -q -L heliosdb-state \"$dev\";",
      "uuid=$(blkid -s UUID -o value \"$dev\");",
      "grep -q \"$uuid\" /etc/fstab || echo \"UUID=$uuid /var/lib/heliosdb ext4 defaults,nofail 0 2\" >> /etc/fstab;",
      "mkdir -p /var/lib/heliosdb && mount -a",
    ]),
  ]
}

# --- encryption key (unless one is given) ---

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:the account root is the key's administrator, the standard key policy; IAM policies narrow it
  #checkov:skip=CKV_AWS_111:same: without the root statement the key becomes unmanageable
  #checkov:skip=CKV_AWS_356:a key policy's resource is always "*" (the key itself)
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "node" {
  count                   = var.kms_key_arn == "" ? 1 : 0
  description             = "${var.name}: state volume and connection secret"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

# --- network ---

resource "aws_security_group" "node" {
  name        = var.name
  description = "heliosdb-replication node ${var.name}"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "monitoring" {
  for_each          = toset(flatten([for c in var.monitoring_cidrs : [for p in [var.node.metrics_port, var.node.health_port] : "${c}|${p}"]]))
  security_group_id = aws_security_group.node.id
  description       = "metrics and health"
  cidr_ipv4         = split("|", each.value)[0]
  from_port         = tonumber(split("|", each.value)[1])
  to_port           = tonumber(split("|", each.value)[1])
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "transport" {
  for_each          = var.node.mode == "apply" ? toset(var.transport_cidrs) : toset([])
  security_group_id = aws_security_group.node.id
  description       = "capture nodes to this apply node (mutual TLS)"
  cidr_ipv4         = each.value
  from_port         = var.node.transport_port
  to_port           = var.node.transport_port
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "databases" {
  for_each          = toset(var.database_cidrs)
  security_group_id = aws_security_group.node.id
  description       = "PostgreSQL: the source's replication stream, the target's apply"
  cidr_ipv4         = each.value
  from_port         = var.database_port
  to_port           = var.database_port
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each          = toset(var.https_egress_cidrs)
  security_group_id = aws_security_group.node.id
  description       = "binary download, Secrets Manager, SSM, CloudWatch"
  cidr_ipv4         = each.value
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_egress_rule" "transport" {
  for_each          = var.node.mode == "capture" ? toset(var.transport_cidrs) : toset([])
  security_group_id = aws_security_group.node.id
  description       = "this capture node to its apply node (mutual TLS)"
  cidr_ipv4         = each.value
  from_port         = var.node.transport_port
  to_port           = var.node.transport_port
  ip_protocol       = "tcp"
}

# --- identity: read its own secret, be reachable by SSM (no SSH) ---

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "node" {
  statement {
    sid       = "ReadItsConnections"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.connections_secret_arn]
  }
  statement {
    sid       = "DecryptThem"
    actions   = ["kms:Decrypt"]
    resources = [local.kms_key]
  }
}

resource "aws_iam_role" "node" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "node" {
  name   = "${var.name}-connections"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.node.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "node" {
  name = var.name
  role = aws_iam_role.node.name
}

# --- the node ---

resource "aws_instance" "node" {
  ami                    = var.ami_id
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  vpc_security_group_ids = [aws_security_group.node.id]
  iam_instance_profile   = aws_iam_instance_profile.node.name
  ebs_optimized          = true
  monitoring             = var.enable_monitoring
  user_data              = module.node_config.cloud_init
  # A changed node file replaces the instance: cloud-init runs once. The
  # state volume stays and is attached to the new one, which resumes.
  user_data_replace_on_change = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    encrypted   = true
    kms_key_id  = local.kms_key
    volume_type = "gp3"
    volume_size = 16
  }

  tags        = local.tags
  volume_tags = local.tags
}

resource "aws_ebs_volume" "state" {
  availability_zone = data.aws_subnet.node.availability_zone
  size              = var.state_volume_gb
  type              = "gp3"
  encrypted         = true
  kms_key_id        = local.kms_key
  tags              = merge(local.tags, { "heliosdb-state" = var.name })

  lifecycle {
    prevent_destroy = true
  }
}

resource "aws_volume_attachment" "state" {
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.state.id
  instance_id = aws_instance.node.id
  # The instance stops its service (SIGTERM, checkpoints written) before
  # the volume is detached.
  stop_instance_before_detaching = true
}

# A failed host: EC2 recovers the instance (same id, same volumes).
resource "aws_cloudwatch_metric_alarm" "recover" {
  alarm_name          = "${var.name}-recover"
  alarm_description   = "Recover ${var.name} when its host fails"
  namespace           = "AWS/EC2"
  metric_name         = "StatusCheckFailed_System"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 2
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  dimensions          = { InstanceId = aws_instance.node.id }
  alarm_actions       = ["arn:${data.aws_partition.current.partition}:automate:${local.region}:ec2:recover"]
  tags                = local.tags
}

# --- backups of the state volume (guide §5.1; keys are backed up apart) ---

resource "aws_iam_role" "dlm" {
  count              = var.enable_backups ? 1 : 0
  name               = "${var.name}-snapshots"
  assume_role_policy = data.aws_iam_policy_document.assume_dlm.json
  tags               = local.tags
}

data "aws_iam_policy_document" "assume_dlm" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["dlm.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy_attachment" "dlm" {
  count      = var.enable_backups ? 1 : 0
  role       = aws_iam_role.dlm[0].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole"
}

resource "aws_dlm_lifecycle_policy" "state" {
  count              = var.enable_backups ? 1 : 0
  description        = "${var.name}: daily snapshots of the state volume"
  execution_role_arn = aws_iam_role.dlm[0].arn
  state              = "ENABLED"

  policy_details {
    resource_types = ["VOLUME"]
    target_tags    = { "heliosdb-state" = var.name }
    schedule {
      name = "daily"
      create_rule {
        interval      = 24
        interval_unit = "HOURS"
        times         = ["03:00"]
      }
      retain_rule {
        count = var.backup_retention_days
      }
      copy_tags = true
    }
  }
  tags = local.tags
}

# --- the source's logical replication (optional) ---

# RDS takes no wal_level: rds.logical_replication = 1 sets it (a reboot).
resource "aws_db_parameter_group" "logical_replication" {
  count       = var.create_logical_replication_parameter_group ? 1 : 0
  name        = "${var.name}-logical-replication"
  family      = var.rds_parameter_group_family
  description = "Logical replication for heliosdb-replication"

  parameter {
    name         = "rds.logical_replication"
    value        = "1"
    apply_method = "pending-reboot"
  }
  parameter {
    name         = "max_replication_slots"
    value        = "20"
    apply_method = "pending-reboot"
  }
  parameter {
    name         = "max_wal_senders"
    value        = "20"
    apply_method = "pending-reboot"
  }
  tags = local.tags
}
